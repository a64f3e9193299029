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
#include "model/config.h"
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

}  // namespace
}  // namespace hm
