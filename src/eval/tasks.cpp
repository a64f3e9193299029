#include "eval/tasks.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/rng.h"
#include "io/json_read.h"
#include "model/model.h"
#include "model/routing.h"
#include "runtime/memory.h"

namespace hm {
namespace {

// Zoology's query-position exponent: slot i (1-based) is drawn with weight a * i^(a-1).
constexpr double kPowerA = 0.01;
// Special tokens of copy and induction; data tokens are >= 2.
constexpr int32_t kNoise = 0, kMarker = 1;

uint64_t mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The split a token row belongs to: the parity of a hash of its tokens (FNV-1a, then mixed so
// that the low bit depends on every token).
int row_parity(const int32_t* in, int L) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (int i = 0; i < L; ++i) {
    h ^= uint32_t(in[i]);
    h *= 0x100000001B3ull;
  }
  return int(mix64(h) & 1u);
}

int uniform_int(Rng& r, int n) { return int(r.next_u64() % uint64_t(n)); }

// k distinct values of [lo, hi), in draw order (k is small next to hi - lo for every task).
void distinct(Rng& r, int lo, int hi, int k, std::vector<int32_t>& out) {
  out.clear();
  while (int(out.size()) < k) {
    const int32_t v = lo + uniform_int(r, hi - lo);
    if (std::find(out.begin(), out.end(), v) == out.end()) out.push_back(v);
  }
}

void mqar(const TaskSpec& s, Rng& r, int32_t* in, int32_t* tgt) {
  const int L = s.seq_len, kv = s.kv, V = s.vocab, half = V / 2;
  std::vector<int32_t> keys, values;
  distinct(r, 1, half, kv, keys);    // keys from [1, V/2), each once
  distinct(r, half, V, kv, values);  // values from [V/2, V)
  for (int j = 0; j < kv; ++j) {
    in[2 * j] = keys[size_t(j)];
    in[2 * j + 1] = values[size_t(j)];
  }
  // Query slots: the region after the pairs holds (L - 2kv)/2 slots of two tokens; key j is
  // queried in slot g_j, drawn without replacement with weight a * i^(a-1) (successive
  // sampling, as numpy's choice(replace=False, p=...) does). Query key at 2kv + 2 g_j; its
  // target is the value; the token after it stays filler, as in Zoology's inputs.
  const int space = (L - 2 * kv) / 2;
  std::vector<double> w(static_cast<size_t>(space));
  double total = 0;
  for (int i = 0; i < space; ++i) total += w[size_t(i)] = kPowerA * std::pow(double(i + 1), kPowerA - 1);
  for (int j = 0; j < kv; ++j) {
    double u = r.uniform() * total;
    int slot = -1;
    for (int i = 0; i < space; ++i) {
      if (w[size_t(i)] == 0) continue;
      slot = i;  // the last live slot absorbs rounding at the top of the range
      if (u < w[size_t(i)]) break;
      u -= w[size_t(i)];
    }
    HM_ASSERT(slot >= 0);
    total -= w[size_t(slot)];
    w[size_t(slot)] = 0;
    const int pos = 2 * kv + 2 * slot;
    in[pos] = keys[size_t(j)];
    tgt[pos] = values[size_t(j)];
  }
}

void copy_task(const TaskSpec& s, Rng& r, int32_t* in, int32_t* tgt) {
  const int L = s.seq_len, n = s.kv, region = L - n;
  std::vector<int32_t> pos;
  distinct(r, 0, region, n, pos);
  std::sort(pos.begin(), pos.end());
  for (int k = 0; k < n; ++k) {
    const int32_t d = 2 + uniform_int(r, s.vocab - 2);
    in[pos[size_t(k)]] = d;
    in[region + k] = kMarker;
    tgt[region + k] = d;  // the k-th marker asks for the k-th remembered token
  }
}

void induction(const TaskSpec& s, Rng& r, int32_t* in, int32_t* tgt) {
  const int L = s.seq_len;
  for (int i = 0; i < L; ++i) in[i] = 2 + uniform_int(r, s.vocab - 2);
  const int p = uniform_int(r, L - 2);  // A at p, B at p + 1 <= L - 2, A again at L - 1
  const int32_t b = 2 + uniform_int(r, s.vocab - 2);
  in[p] = kMarker;
  in[p + 1] = b;
  in[L - 1] = kMarker;
  tgt[L - 1] = b;
}

}  // namespace

std::vector<std::string> task_names() { return {"mqar", "copy", "induction"}; }

TaskSpec resolve_task(TaskSpec s) {
  if (s.name == "mqar") {
    if (s.vocab == 0) s.vocab = 8192;
    if (s.kv == 0) s.kv = std::max(1, s.seq_len / 16);
  } else if (s.name == "copy") {
    if (s.vocab == 0) s.vocab = 16;
    if (s.kv == 0) s.kv = std::max(1, std::min(16, s.seq_len / 4));
  } else if (s.name == "induction") {
    if (s.vocab == 0) s.vocab = 16;
    s.kv = 0;
  } else {
    throw Error(detail::cat("unknown task '", s.name, "' (known: mqar, copy, induction)"));
  }
  return s;
}

void validate_task(const TaskSpec& s) {
  const int V = s.vocab, L = s.seq_len;
  HM_CHECK(L >= 1, "task ", s.name, ": --seq-len must be >= 1 (got ", L, ")");
  if (s.name == "mqar") {
    HM_CHECK(V > L, "task mqar: the vocabulary (", V, ") must exceed --seq-len (", L, ")");
    HM_CHECK(L % 2 == 0, "task mqar: --seq-len must be even (got ", L, ")");
    HM_CHECK(s.kv >= 1, "task mqar: --kv must be >= 1 (got ", s.kv, ")");
    HM_CHECK(4 * int64_t(s.kv) <= L, "task mqar: 4 x --kv (", 4 * int64_t(s.kv), ") must not exceed --seq-len (",
             L, ")");
  } else if (s.name == "copy") {
    HM_CHECK(V >= 3, "task copy: the vocabulary must be >= 3 (noise, marker, data; got ", V, ")");
    HM_CHECK(s.kv >= 1, "task copy: --kv (tokens to copy) must be >= 1 (got ", s.kv, ")");
    HM_CHECK(2 * int64_t(s.kv) <= L, "task copy: 2 x --kv (", 2 * int64_t(s.kv),
             ") must not exceed --seq-len (", L, ")");
  } else if (s.name == "induction") {
    HM_CHECK(V >= 4, "task induction: the vocabulary must be >= 4 (got ", V, ")");
    HM_CHECK(L >= 4, "task induction: --seq-len must be >= 4 (got ", L, ")");
  } else {
    throw Error(detail::cat("unknown task '", s.name, "' (known: mqar, copy, induction)"));
  }
}

int scored_per_example(const TaskSpec& s) { return s.name == "induction" ? 1 : s.kv; }

double chance_accuracy(const TaskSpec& s) {
  return s.name == "mqar" ? 1.0 / s.kv : 1.0 / (s.vocab - 2);
}

void task_example(const TaskSpec& s, TaskSplit split, uint64_t seed, uint64_t index, int32_t* in,
                  int32_t* tgt) {
  const int L = s.seq_len;
  Rng r(mix64(mix64(seed ^ (split == TaskSplit::Train ? 0x7A11ull : 0x7E57ull)) ^ index));
  for (;;) {
    std::fill_n(in, L, kNoise);
    std::fill_n(tgt, L, -1);
    if (s.name == "mqar") mqar(s, r, in, tgt);
    else if (s.name == "copy") copy_task(s, r, in, tgt);
    else if (s.name == "induction") induction(s, r, in, tgt);
    else HM_ASSERT(false && "unresolved task");
    if (row_parity(in, L) == int(split)) return;
  }
}

void task_examples(const TaskSpec& s, TaskSplit split, uint64_t seed, uint64_t first, int n,
                   int32_t* in, int32_t* tgt) {
  const size_t L = size_t(s.seq_len);
  for (int i = 0; i < n; ++i) task_example(s, split, seed, first + uint64_t(i), in + i * L, tgt + i * L);
}

std::vector<std::string> task_role_names(const TaskSpec& s) {
  if (s.name == "mqar") return {"key", "value", "query", "filler"};
  if (s.name == "copy") return {"noise", "data", "marker"};
  HM_CHECK(s.name == "induction", "unknown task '", s.name, "'");
  return {"trigger", "B", "query", "other"};
}

void task_roles(const TaskSpec& s, const int32_t* in, int* role) {
  const int L = s.seq_len;
  if (s.name == "mqar") {
    for (int p = 0; p < L; ++p)
      role[p] = p < 2 * s.kv ? p % 2 : in[p] != kNoise ? 2 : 3;
  } else if (s.name == "copy") {
    for (int p = 0; p < L; ++p) role[p] = p >= L - s.kv ? 2 : in[p] != kNoise ? 1 : 0;
  } else {
    HM_CHECK(s.name == "induction", "unknown task '", s.name, "'");
    std::fill_n(role, L, 3);
    role[L - 1] = 2;
    for (int p = 0; p < L - 1; ++p)
      if (in[p] == kMarker) {  // the trigger A
        role[p] = 0;
        role[p + 1] = 1;
        break;
      }
  }
}

nlohmann::json task_to_json(const TaskSpec& s) {
  return {{"name", s.name}, {"vocab", s.vocab}, {"seq_len", s.seq_len}, {"kv", s.kv}};
}

TaskSpec task_from_json(const nlohmann::json& j) {
  // Typed, range-checked reads: a float or an out-of-range number is an error naming the field,
  // not a value silently truncated or wrapped (validate_task then checks the task's own rules).
  const JsonFields f(j, "task settings");
  TaskSpec s;
  s.name = f.get_string("name");
  s.vocab = int(f.get_int("vocab", 1, INT32_MAX));
  s.seq_len = int(f.get_int("seq_len", 1, INT32_MAX));
  s.kv = int(f.get_int("kv", 0, INT32_MAX));
  return s;
}

void score_logits_row(const float* z, int V, int32_t y, TaskScore& sc, double& nll) {
  int best = 0;
  for (int v = 1; v < V; ++v)
    if (z[v] > z[best]) best = v;
  double se = 0;
  for (int v = 0; v < V; ++v) se += std::exp(double(z[v]) - double(z[best]));
  nll += double(z[best]) + std::log(se) - double(z[y]);
  sc.correct += best == y;
  ++sc.scored;
}

TaskScore score_task(HybridModel& model, const TaskSpec& s, int64_t n, int batch, uint64_t first) {
  HM_CHECK(n >= 1, "task evaluation needs at least one example (got ", n, ")");
  HM_CHECK(batch >= 1, "task evaluation batch must be >= 1 (got ", batch, ")");
  const ModelConfig& c = model.config();
  HM_CHECK(c.vocab_size >= s.vocab, "task ", s.name, " uses ", s.vocab,
           " tokens but the model's vocab_size is ", c.vocab_size);
  model.prepare();
  const int L = s.seq_len, V = c.vocab_size;
  const int B = int(std::min<int64_t>(batch, n));
  HybridMemory mem(model.backend(), c, B, L, KvType::F32);
  std::vector<int32_t> in(size_t(B) * L), tgt(size_t(B) * L);
  std::vector<float> logits;
  TaskScore sc;
  double nll = 0;
  for (int64_t done = 0; done < n;) {
    const int nb = int(std::min<int64_t>(B, n - done));
    task_examples(s, TaskSplit::Test, kTaskTestSeed, first + uint64_t(done), nb, in.data(), tgt.data());
    Batch b;
    b.logits_all = true;
    for (int k = 0; k < nb; ++k) {
      mem.seq_rm(k);
      b.add(k, std::vector<int32_t>(in.begin() + int64_t(k) * L, in.begin() + int64_t(k + 1) * L));
    }
    model.forward(b, mem, logits);
    for (int64_t t = 0; t < int64_t(nb) * L; ++t) {
      const int32_t y = tgt[size_t(t)];
      if (y < 0) continue;
      score_logits_row(logits.data() + t * V, V, y, sc, nll);
    }
    done += nb;
    sc.examples = done;
  }
  sc.accuracy = sc.scored ? double(sc.correct) / double(sc.scored) : 0;
  sc.loss = sc.scored ? nll / double(sc.scored) : 0;
  return sc;
}

TaskRouting route_task(HybridModel& model, const TaskSpec& s, int64_t n) {
  HM_CHECK(n >= 1, "task routing needs at least one example (got ", n, ")");
  HM_CHECK(model.config().vocab_size >= s.vocab, "task ", s.name, " uses ", s.vocab,
           " tokens but the model's vocab_size is ", model.config().vocab_size);
  model.prepare();
  const int L = s.seq_len;
  TaskRouting tr;
  tr.roles = task_role_names(s);
  const size_t R = tr.roles.size();
  tr.positions.assign(R, 0);
  std::vector<int32_t> in(static_cast<size_t>(L)), tgt(static_cast<size_t>(L));
  std::vector<int> role(static_cast<size_t>(L));
  for (int64_t i = 0; i < n; ++i) {
    task_example(s, TaskSplit::Test, kTaskTestSeed, uint64_t(i), in.data(), tgt.data());
    task_roles(s, in.data(), role.data());
    const RoutingAnalysis ra = get_routing_analysis(model, in);
    if (tr.layers.empty()) {
      for (const LayerRouting& l : ra.layers) tr.layers.push_back(l.layer);
      tr.attention.assign(tr.layers.size(), std::vector<double>(R, 0.0));
      tr.attention_overall.assign(tr.layers.size(), 0.0);
    }
    for (int p = 0; p < L; ++p) ++tr.positions[size_t(role[size_t(p)])];
    for (size_t k = 0; k < ra.layers.size(); ++k) {
      for (int p = 0; p < L; ++p) tr.attention[k][size_t(role[size_t(p)])] += ra.layers[k].attention_share[size_t(p)];
      tr.attention_overall[k] += ra.layers[k].usage.attention;
    }
  }
  for (size_t k = 0; k < tr.layers.size(); ++k) {
    for (size_t r = 0; r < R; ++r)
      if (tr.positions[r] > 0) tr.attention[k][r] /= double(tr.positions[r]);
    tr.attention_overall[k] /= double(n);
  }
  return tr;
}

}  // namespace hm
