// Bounded sizes and the JSON reader (docs/RELIABILITY.md): hostile numbers, nesting and sizes in
// the files the engine reads are errors that name the file and the field.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>

#include "core/checked.h"
#include "core/error.h"
#include "io/json_read.h"
#include "eval/compare.h"
#include "backend/backend.h"
#include "core/rng.h"
#include "core/threads.h"
#include "model/config.h"
#include "model/memory_estimate.h"
#include "model/model.h"
#include "runtime/memory.h"
#include "train/model_grad.h"
#include "train/trainer.h"
#include "test_util.h"

namespace hm {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using test::TempDir;

void write(const fs::path& p, const std::string& text) { std::ofstream(p, std::ios::binary) << text; }

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// The tiny preset's config.json with `field` replaced by the raw JSON text `value`.
std::string config_with(const std::string& field, const std::string& value) {
  json j = config_to_json(preset("tiny"));
  j[field] = "@@";
  std::string s = j.dump();
  s.replace(s.find("\"@@\""), 4, value);
  return s;
}

TEST(Limits, HostileNumbersInConfigNameFileAndField) {
  TempDir dir("limits_cfg");
  const std::string path = (dir.path / "config.json").string();
  struct Case { const char* field; std::string value; };
  const std::vector<Case> cases = {
      {"d_model", "1e300"},                  // a double far outside int: no cast may happen
      {"d_model", "3.5"},
      {"n_layers", "-1"},
      {"d_model", "99999999999999999999"},   // beyond uint64: parsed as a double
      {"vocab_size", "18446744073709551615"},  // uint64 max
      {"d_model", "-9223372036854775808"},
      {"d_state", "1e400"},                  // overflows double: a parse error, at its field
      {"norm_eps", "1e300"},                 // double to float would be undefined
      {"rope_theta", "-1e39"},
      {"d_model", "[" + std::string(100000, '[')},  // nesting deep enough to overflow a recursive reader
      {"d_model", std::string(100000, '[') + std::string(100000, ']')},
      {"attention_layers", "[1, 3.5]"},
      {"attention_layers", "[1, 4294967296]"},
      {"d_model", "70000"},                  // an int, but above kMaxDModel
  };
  for (const Case& c : cases) {
    write(path, config_with(c.field, c.value));
    const std::string msg = error_of([&] { load_config(path); });
    const std::string shown = c.value.substr(0, 30);
    EXPECT_NE(msg.find(path), std::string::npos) << c.field << "=" << shown << ": " << msg;
    EXPECT_NE(msg.find(std::string("'") + c.field), std::string::npos) << c.field << "=" << shown << ": " << msg;
  }
}

TEST(Limits, EveryConfigBoundNamesItsField) {
  struct Case { const char* field; int64_t over; };
  for (const Case& c : {Case{"d_model", kMaxDModel + 1}, Case{"n_layers", kMaxLayers + 1},
                        Case{"vocab_size", kMaxVocab + 1}, Case{"d_state", kMaxDState + 1},
                        Case{"d_conv", kMaxDConv + 1}, Case{"expand", kMaxExpand + 1},
                        Case{"dt_rank", kMaxDtRank + 1}, Case{"n_heads", kMaxHeads + 1},
                        Case{"n_kv_heads", kMaxHeads + 1}, Case{"d_ff", kMaxDff + 1},
                        Case{"routing_chunk", kMaxRoutingChunk + 1}, Case{"d_model", int64_t(1) << 31}}) {
    json j = config_to_json(preset("tiny"));
    j[c.field] = c.over;
    const std::string msg = error_of([&] { config_from_json(j); });
    EXPECT_NE(msg.find(std::string("'") + c.field + "'"), std::string::npos) << c.field << ": " << msg;
  }
  json j = config_to_json(preset("tiny"));
  j["rope_theta"] = 1e13;
  EXPECT_NE(error_of([&] { config_from_json(j); }).find("'rope_theta'"), std::string::npos);
  j = config_to_json(preset("tiny"));
  j["norm_eps"] = 2.0;
  EXPECT_NE(error_of([&] { config_from_json(j); }).find("'norm_eps'"), std::string::npos);
  // Every field at its bound is fine on its own (a preset at the edges still loads)...
  ModelConfig c = preset("tiny");
  c.n_layers = kMaxLayers;
  c.d_state = kMaxDState;
  c.d_conv = kMaxDConv;
  EXPECT_NO_THROW(validate(c));
  // ...but sizes whose product one kernel cannot index are refused naming the tensor.
  c = preset("tiny");
  c.vocab_size = kMaxVocab;
  c.d_model = 256;
  c.n_heads = c.n_kv_heads = 4;
  const std::string msg = error_of([&] { validate(c); });
  EXPECT_NE(msg.find("backbone.embeddings.weight"), std::string::npos) << msg;
  EXPECT_NE(msg.find("'vocab_size'"), std::string::npos) << msg;
}

TEST(Limits, JsonReaderBoundsDepthSizeAndDuplicates) {
  TempDir dir("limits_json");
  const std::string path = (dir.path / "x.json").string();
  // Depth: kJsonMaxDepth levels parse, one more does not.
  write(path, std::string(kJsonMaxDepth, '[') + std::string(kJsonMaxDepth, ']'));
  EXPECT_NO_THROW(parse_json_file(path));
  write(path, "{\"a\": " + std::string(kJsonMaxDepth, '[') + std::string(kJsonMaxDepth, ']') + "}");
  std::string msg = error_of([&] { parse_json_file(path); });
  EXPECT_NE(msg.find("deeper than"), std::string::npos) << msg;
  EXPECT_NE(msg.find("'a'"), std::string::npos) << msg;
  // A repeated key is an error (the DOM would keep only the last one).
  write(path, "{\"d_model\": 32, \"x\": {\"k\": 1, \"k\": 2}}");
  msg = error_of([&] { parse_json_file(path); });
  EXPECT_NE(msg.find("'k' appears twice"), std::string::npos) << msg;
  write(path, "[{\"k\": 1}, {\"k\": 2}]");  // the same key in sibling objects is fine
  EXPECT_NO_THROW(parse_json_file(path));
  // Size: a file over the limit is refused before it is read.
  write(path, "[" + std::string(1000, ' ') + "]");
  msg = error_of([&] { parse_json_file(path, 100); });
  EXPECT_NE(msg.find(path), std::string::npos) << msg;
  EXPECT_NE(msg.find("1002 bytes"), std::string::npos) << msg;
  EXPECT_NE(error_of([&] { parse_json_file((dir.path / "absent.json").string()); }).find("absent.json"),
            std::string::npos);
  EXPECT_NE(error_of([&] { parse_json_file(dir.str()); }).find("not a regular file"), std::string::npos);
}

TEST(Limits, TypedConversionsCheckRangeBeforeConverting) {
  const std::string o = "f.json";
  EXPECT_EQ(json_to_int(json(5), 0, 10, o, "x"), 5);
  EXPECT_EQ(json_to_int(json(-3), -5, 10, o, "x"), -3);
  EXPECT_EQ(json_to_int(json(uint64_t(INT64_MAX)), 0, INT64_MAX, o, "x"), INT64_MAX);
  for (const json& bad : {json(11), json(-1), json(uint64_t(1) << 63), json(1e300), json(2.0), json("3"),
                          json(nullptr), json::array({1})}) {
    const std::string msg = error_of([&] { json_to_int(bad, 0, 10, o, "x"); });
    EXPECT_NE(msg.find("f.json: field 'x' must be an integer in [0, 10]"), std::string::npos) << msg;
  }
  EXPECT_EQ(json_to_uint64(json(UINT64_MAX), o, "s"), UINT64_MAX);
  EXPECT_NE(error_of([&] { json_to_uint64(json(-1), o, "s"); }).find("'s'"), std::string::npos);
  EXPECT_NE(error_of([&] { json_to_uint64(json(1.5), o, "s"); }).find("'s'"), std::string::npos);
  EXPECT_DOUBLE_EQ(json_to_double(json(3), 0, 10, o, "d"), 3.0);
  for (const json& bad : {json(std::numeric_limits<double>::infinity()), json(std::nan("")), json(11.0),
                          json("1")})
    EXPECT_NE(error_of([&] { json_to_double(bad, 0, 10, o, "d"); }).find("'d'"), std::string::npos)
        << bad.dump();
  // float fields: a double beyond float's range is refused, not cast.
  const json obj = {{"lr", 1e300}, {"ok", 0.5}, {"inner", {{"n", -1}}}};
  const JsonFields f(obj, o);
  EXPECT_FLOAT_EQ(f.get_float("ok"), 0.5f);
  EXPECT_NE(error_of([&] { f.get_float("lr"); }).find("'lr'"), std::string::npos);
  // Nested fields are named by their path; missing and unknown fields too.
  EXPECT_NE(error_of([&] { f.object("inner").get_int("n", 0, 5); }).find("'inner.n'"), std::string::npos);
  EXPECT_NE(error_of([&] { f.object("inner").at("m"); }).find("missing field 'inner.m'"), std::string::npos);
  EXPECT_NE(error_of([&] { f.check_known({"lr", "ok"}); }).find("unknown field 'inner'"), std::string::npos);
  EXPECT_NE(error_of([&] { f.object("ok"); }).find("'ok'"), std::string::npos);
}

// trainer_state.json: every field is type- and range-checked before nlohmann converts it (a
// double beyond int64 converted to an integer is undefined, and was silently accepted).
TEST(Limits, HostileTrainerStateNamesFileAndField) {
  TempDir dir("limits_state");
  const fs::path file = dir.path / "trainer_state.json";
  struct Case { std::string text; const char* field; };
  const std::vector<Case> cases = {
      {R"({"step": 1e300})", "'step'"},
      {R"({"step": -1})", "'step'"},
      {R"({"step": 3, "settings": {"task": {"name": "mqar", "vocab": 99999999999999999999}}})", "'settings.task.vocab'"},
      {R"({"step": 3, "settings": {"seq_len": 4294967296}})", "'settings.seq_len'"},
      {R"({"step": 3, "settings": {"lr": 1e300}})", "'settings.lr'"},
      {R"({"step": 3, "settings": {"seed": -5}})", "'settings.seed'"},
      {R"({"step": 3, "settings": {"grad_ckpt": 1}})", "'settings.grad_ckpt'"},
      {R"({"step": 3, "settings": "x"})", "'settings'"},
      {R"({"step": 3, "rng": {"s": [1, 2, 3], "spare_bits": 0, "has_spare": false}})", "'rng.s'"},
      {R"({"step": 3, "rng": {"s": [1, 2, 3, 1.5], "spare_bits": 0, "has_spare": false}})", "'rng.s[3]'"},
      {R"({"step": 3, "step": 4})", "'step' appears twice"},
      {R"({"step": 3, "settings": {"task": )" + std::string(100000, '[') + "}}", "'task'"},
  };
  for (const Case& c : cases) {
    write(file, c.text);
    for (int reader = 0; reader < 2; ++reader) {
      const std::string msg =
          error_of([&] { reader == 0 ? (void)checkpoint_task(dir.str()) : (void)trained_seq_len(dir.str()); });
      EXPECT_NE(msg.find(file.string()), std::string::npos) << c.text.substr(0, 80) << ": " << msg;
      EXPECT_NE(msg.find(c.field), std::string::npos) << c.text.substr(0, 80) << ": " << msg;
    }
  }
  write(file, R"({"step": 7, "settings": {"seq_len": 16, "task": {"name": "mqar", "vocab": 40, "seq_len": 16, "kv": 1}}})");
  int64_t step = 0;
  EXPECT_EQ(checkpoint_task(dir.str(), &step).vocab, 40);
  EXPECT_EQ(step, 7);
  EXPECT_EQ(trained_seq_len(dir.str()), 16);
}

// hm compare's result.json goes through the same reader: a result whose numbers are out of range
// (here a negative accuracy) or whose fields repeat is retrained, not reported.
TEST(Limits, CompareRetrainsAResultOutOfRange) {
  TempDir d("limits_compare");
  CompareConfig c;
  c.task = "mqar";
  c.task_vocab = 20;
  c.kv = 2;
  c.seq_lens = {8};
  c.sizes = {16};
  c.archs = {"mamba"};
  c.lrs = {1e-3f};
  c.budget = 2;
  c.batch = 2;
  c.test_examples = 4;
  c.threads = 1;
  c.progress = false;
  c.out_dir = d.str();
  const auto first = run_compare(c);
  ASSERT_EQ(first.size(), 1u);
  ASSERT_TRUE(first[0].error.empty()) << first[0].error;
  const fs::path result = d.path / "runs" / "mqar_L8_d16_mamba_lr0.001" / "result.json";
  ASSERT_TRUE(fs::exists(result));
  json j;
  std::ifstream(result) >> j;
  for (const std::string& bad : {std::string("-1"), std::string("1e300, \"metric\": 0.5")}) {
    std::string text = j.dump();
    const size_t at = text.find("\"metric\":") + 9;
    text.replace(at, text.find(',', at) - at, bad);
    write(result, text);
    const auto again = run_compare(c);
    ASSERT_EQ(again.size(), 1u);
    EXPECT_EQ(again[0].metric, first[0].metric) << bad;  // retrained: the same numbers again
    EXPECT_NE(again[0].train_s, first[0].train_s) << bad << ": the damaged result was reused";
  }
}

TEST(Limits, CheckedArithmeticNamesTheQuantity) {
  EXPECT_EQ(checked_mul(int64_t(1) << 31, int64_t(1) << 31, "x"), int64_t(1) << 62);
  EXPECT_EQ(checked_mul({2, 3, 7}, "x"), 42);
  EXPECT_EQ(checked_add(INT64_MAX - 1, 1, "x"), INT64_MAX);
  EXPECT_NE(error_of([] { checked_mul(int64_t(1) << 32, int64_t(1) << 31, "KV cache bytes"); })
                .find("KV cache bytes"),
            std::string::npos);
  EXPECT_NE(error_of([] { checked_add(INT64_MAX, 1, "weights"); }).find("weights"), std::string::npos);
  EXPECT_NE(error_of([] { checked_mul(-1, 2, "n"); }).find("negative"), std::string::npos);
}

// The estimate against what the code allocates: the weights and inference memory exactly (every
// slot touched), training activations against the trainer's own peak measurement.
TEST(Limits, MemoryEstimateMatchesWhatIsAllocated) {
  auto be = make_cpu_backend();
  for (const char* name : {"tiny", "true-tiny", "demo"}) {
    const ModelConfig c = preset(name);
    HybridModel model(c, *be);
    model.prepare();
    RunShape rs;
    rs.slots = 3;
    rs.ctx = 100;
    rs.kv_bytes = 2;
    const MemoryEstimate e = estimate_memory(c, rs);
    int64_t a_bytes = 0;
    for (int i = 0; i < c.n_layers; ++i)
      if (!c.is_attention(i)) a_bytes += int64_t(c.d_inner()) * c.d_state * 4;
    EXPECT_EQ(e.weights, model.params().numel() * 4 + a_bytes) << name;
    HybridMemory mem(*be, c, 3, 100, KvType::F16);
    for (int i = 0; i < c.n_layers; ++i)
      if (c.has_attention_path(i))
        for (int s = 0; s < 3; ++s) mem.kv().k(i, s), mem.kv().v(i, s);
    const int64_t actual = int64_t(mem.bytes_reserved());
    // bytes_reserved also counts the per-slot length and position counters.
    EXPECT_GE(actual, e.kv_cache + e.state) << name;
    EXPECT_LE(actual, e.kv_cache + e.state + 4 * 3 * (c.n_layers + 1)) << name;
  }
  // Training activations: at least what loss_and_grad keeps, and not far above it.
  for (const char* name : {"tiny", "true-tiny"}) {
    for (bool ckpt : {false, true}) {
      for (int chunk : {0, 8}) {
        const ModelConfig c = preset(name);
        Params p(c), g(c);
        test::randomize_params(p, 3);
        std::fill(g.data(), g.data() + g.numel(), 0.0f);
        const int B = 2, L = 48;
        Rng rng(5);
        const auto tok = test::tokens(rng, B * L, c.vocab_size), tgt = test::tokens(rng, B * L, c.vocab_size);
        reset_grad_activation_peak_bytes();
        loss_and_grad(p, g, tok.data(), tgt.data(), B, L, chunk, ckpt);
        const int64_t measured = grad_activation_peak_bytes();
        RunShape rs;
        rs.train_batch = B;
        rs.seq_len = L;
        rs.threads = std::min(B, num_threads());
        rs.scan_chunk = chunk;
        rs.grad_ckpt = ckpt;
        const MemoryEstimate e = estimate_memory(c, rs);
        EXPECT_GE(e.activations, measured) << name << " ckpt " << ckpt << " chunk " << chunk;
        EXPECT_LE(e.activations, 2 * measured) << name << " ckpt " << ckpt << " chunk " << chunk;
        std::printf("%s ckpt %d chunk %d: estimate %lld measured %lld (%.2fx)\n", name, int(ckpt), chunk,
                    static_cast<long long>(e.activations), static_cast<long long>(measured),
                    double(e.activations) / double(measured));
      }
    }
  }
}

TEST(Limits, MemoryCheckRefusesWhatDoesNotFit) {
  // A config inside every field bound whose weights alone are terabytes: refused up front.
  ModelConfig big = preset("seed");
  big.d_model = 16384;
  big.n_layers = kMaxLayers;
  big.n_heads = big.n_kv_heads = 128;
  big.attention_layers = {};
  const MemoryEstimate e = estimate_memory(big, RunShape{});
  EXPECT_GT(e.weights, int64_t(1) << 42);
  std::string msg = error_of([&] { check_memory(e, "hm init"); });
  EXPECT_NE(msg.find("hm init needs about"), std::string::npos) << msg;
  EXPECT_NE(msg.find("weights"), std::string::npos) << msg;
  EXPECT_NE(msg.find("available"), std::string::npos) << msg;
  // A context whose KV cache does not fit, and one whose size overflows 64 bits.
  RunShape rs;
  rs.slots = 64;
  rs.ctx = int64_t(1) << 31;
  msg = error_of([&] { check_memory(estimate_memory(preset("seed"), rs), "hm generate --ctx 2147483648"); });
  EXPECT_NE(msg.find("KV cache"), std::string::npos) << msg;
  rs.ctx = INT64_MAX / 4;
  msg = error_of([&] { estimate_memory(preset("seed"), rs); });
  EXPECT_NE(msg.find("KV cache bytes"), std::string::npos) << msg;
  // --max-memory below the estimate refuses; above it passes.
  const MemoryEstimate tiny = estimate_memory(preset("tiny"), RunShape{});
  set_memory_limit(tiny.total() - 1);
  msg = error_of([&] { check_memory(tiny, "hm init"); });
  EXPECT_NE(msg.find("--max-memory"), std::string::npos) << msg;
  set_memory_limit(tiny.total());
  EXPECT_NO_THROW(check_memory(tiny, "hm init"));
  set_memory_limit(0);
  EXPECT_GT(available_memory_bytes(), 0);
}

TEST(Limits, MemorySizesParse) {
  EXPECT_EQ(parse_memory_size("2G"), int64_t(2) << 30);
  EXPECT_EQ(parse_memory_size("512M"), int64_t(512) << 20);
  EXPECT_EQ(parse_memory_size("1.5g"), int64_t(3) << 29);
  EXPECT_EQ(parse_memory_size("64KiB"), int64_t(64) << 10);
  EXPECT_EQ(parse_memory_size("2GB"), int64_t(2) << 30);
  EXPECT_EQ(parse_memory_size("1000000"), 1000000);
  for (const char* bad : {"", "G", "2X", "-1G", "0", "nan", "inf", "1e30T", " 2G", "2 G", "2GBB"})
    EXPECT_NE(error_of([&] { parse_memory_size(bad); }).find("memory size"), std::string::npos) << bad;
}

}  // namespace
}  // namespace hm
