// Synthetic recall tasks (docs/EVALUATION.md gives every format token by token):
//   mqar       multi-query associative recall, as Zoology (arXiv 2312.04927) defines it
//   copy       selective copying (Mamba, arXiv 2312.00752, sec. 4.1)
//   induction  induction heads (same paper)
// An example is an input row and a target row of seq_len tokens each; target -1 is not scored
// (loss_and_grad skips it), every other target is what the model must predict at that position.
//
// Draws are pure functions of (spec, split, seed, index): example i of a split is the same on
// every machine and in every run, so training resumes exactly and `hm eval` re-creates the test
// set. Train and test never share an example, by construction: each split draws from its own
// seed stream, and an example is kept only if the parity of a hash of its tokens matches its
// split (train even, test odd), otherwise its stream draws again; the two splits hold disjoint
// halves of the example space.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace hm {

struct TaskSpec {
  std::string name;  // mqar | copy | induction
  int vocab = 0;     // 0: the task's default (mqar 8192 as Zoology; copy and induction 16)
  int seq_len = 0;   // L, tokens per example (inputs and targets)
  int kv = 0;        // mqar: key-value pairs (0: L/16, Zoology's sweep ratio);
                     // copy: tokens to copy (0: min(16, L/4)); induction: unused
};

// Fills the 0 fields with the task's defaults; unknown name: hm::Error listing the tasks.
TaskSpec resolve_task(TaskSpec s);
// hm::Error naming the violated constraint (after resolve_task):
//   mqar: V > L, L even, kv >= 1, 4 kv <= L;  copy: V >= 3, kv >= 1, 2 kv <= L;
//   induction: V >= 4, L >= 4.
void validate_task(const TaskSpec& s);
std::vector<std::string> task_names();
// Scored positions per example: mqar kv, copy kv, induction 1.
int scored_per_example(const TaskSpec& s);
// The accuracy of guessing: mqar 1/kv (any value of the context), copy 1/(V-2), induction
// 1/(V-2) (any data token).
double chance_accuracy(const TaskSpec& s);

enum class TaskSplit { Train = 0, Test = 1 };

// Writes example `index` of the split into in[0..L) and tgt[0..L). spec must be resolved and
// valid (HM_ASSERT otherwise: callers validate first).
void task_example(const TaskSpec& s, TaskSplit split, uint64_t seed, uint64_t index, int32_t* in,
                  int32_t* tgt);
// Examples first .. first+n-1 of the split, row-major [n, L].
void task_examples(const TaskSpec& s, TaskSplit split, uint64_t seed, uint64_t first, int n,
                   int32_t* in, int32_t* tgt);

// The seed every test set is drawn with, whatever the training seed: all models are scored on
// the same test examples.
constexpr uint64_t kTaskTestSeed = 0x7E57DA7Aull;

// What each position of an example is, for reading a model's behaviour by role (hm route):
//   mqar       key, value (the pairs), query (a queried key), filler
//   copy       noise, data (a token to copy), marker (an answer position)
//   induction  trigger (the first A), B (the token after it), query (the final A), other
// task_role_names(s)[role[p]] names position p of input row `in`.
std::vector<std::string> task_role_names(const TaskSpec& s);
void task_roles(const TaskSpec& s, const int32_t* in, int* role);

nlohmann::json task_to_json(const TaskSpec& s);
TaskSpec task_from_json(const nlohmann::json& j);  // hm::Error for a malformed object

}  // namespace hm

namespace hm {

class HybridModel;

struct TaskScore {
  int64_t examples = 0, scored = 0, correct = 0;
  double accuracy = 0;  // correct / scored: argmax of the logits == target
  double loss = 0;      // mean cross-entropy over the scored positions (nats)
};

// One scored position: its row of logits z [V] against target y (counts a correct argmax into sc,
// adds the cross-entropy to nll). score_task's and hm compare's device scorer's one rule.
void score_logits_row(const float* z, int V, int32_t y, TaskScore& sc, double& nll);

// Scores test examples first .. first+n-1 (seed kTaskTestSeed) with the inference forward
// (float32 KV cache, every position's logits), `batch` examples per forward. Calls
// model.prepare() first, so the parameters may have changed since the last forward.
TaskScore score_task(HybridModel& model, const TaskSpec& s, int64_t n, int batch = 16,
                     uint64_t first = 0);

// Where the routers of a true-hybrid model send each role of a task (does hard routing give the
// queries, and the pairs they recall, to attention?): get_routing_analysis over test examples
// 0 .. n-1, averaged per role. hm::Error for a model without true-hybrid layers.
struct TaskRouting {
  std::vector<std::string> roles;               // task_role_names
  std::vector<int64_t> positions;               // [role] positions of that role seen
  std::vector<int> layers;                      // the true-hybrid layers, in model order
  std::vector<std::vector<double>> attention;   // [layer][role] mean attention share
  std::vector<double> attention_overall;        // [layer] mean over every position
};
TaskRouting route_task(HybridModel& model, const TaskSpec& s, int64_t n);

}  // namespace hm
