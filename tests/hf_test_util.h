// Helpers of the Hugging Face tests (test_hf*.cpp, test_bamba.cpp, test_falcon_h1.cpp,
// test_nemotron_h.cpp): fixture folders hold config.json, expected.json and transformers' logits
// as raw little-endian float32; bad folders must fail to load with a message naming the fault.
#pragma once
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <algorithm>
#include <cstdio>
#include <functional>
#include <initializer_list>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/error.h"
#include "io/hf_model.h"
#include "runtime/tokenizer.h"
#include "test_util.h"

namespace hm::test {

inline nlohmann::json read_json(const std::filesystem::path& p) {
  std::ifstream f(p);
  return nlohmann::json::parse(f);
}

inline void write_text(const std::filesystem::path& p, const std::string& s) {
  std::ofstream f(p, std::ios::binary);
  f << s;
}

inline std::vector<float> read_f32_file(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::vector<float> v(size_t(std::filesystem::file_size(p)) / sizeof(float));
  f.read(reinterpret_cast<char*>(v.data()), std::streamsize(v.size() * sizeof(float)));
  return v;
}

// An hm::Error from fn whose message contains every one of `parts`.
inline void expect_error_naming(const std::function<void()>& fn, std::initializer_list<std::string> parts) {
  try {
    fn();
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    for (const std::string& p : parts) EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
  }
}

// Loading the model folder dir fails, naming every one of `parts`.
inline void expect_load_error(const std::filesystem::path& dir, std::initializer_list<std::string> parts) {
  auto be = make_cpu_backend();
  expect_error_naming([&] { load_any_model(dir.string(), *be); }, parts);
}

// config.json through the mapping's own reader (Python's Infinity becomes the string "Infinity",
// which the mapping reads back the same), edited, written back.
inline void edit_config(const std::filesystem::path& dir, const std::function<void(nlohmann::json&)>& edit) {
  nlohmann::json j = parse_hf_json_file((dir / "config.json").string());
  edit(j);
  write_text(dir / "config.json", j.dump(2));
}

// with(edit, parts): dir's config.json as it is now, edited, must fail to load naming `parts`.
inline auto config_refusals(const std::filesystem::path& dir) {
  const std::string orig = parse_hf_json_file((dir / "config.json").string()).dump(2);
  return [dir, orig](const std::function<void(nlohmann::json&)>& edit, std::initializer_list<std::string> parts) {
    write_text(dir / "config.json", orig);
    edit_config(dir, edit);
    expect_load_error(dir, parts);
  };
}

// with(edit, parts): tokenizer.json `orig`, edited and written to dir, must fail to load naming `parts`.
inline auto tokenizer_refusals(const std::filesystem::path& dir, const nlohmann::json& orig) {
  return [dir, orig](const std::function<void(nlohmann::json&)>& edit, std::initializer_list<std::string> parts) {
    nlohmann::json j = orig;
    edit(j);
    write_text(dir / "tokenizer.json", j.dump());
    expect_error_naming([&] { load_tokenizer(dir.string()); }, parts);
  };
}


// A committed fixture folder (make_fixtures.py writes them on a machine with transformers): its
// absence is a failure, not a skip.
inline bool has_fixture(const std::filesystem::path& dir) {
  const bool ok = std::filesystem::exists(dir / "expected.json");
  EXPECT_TRUE(ok) << dir << " has no expected.json: run tests/fixtures/hf/make_fixtures.py where torch and "
                              "transformers are installed (the device machine) and commit the folder";
  return ok;
}

// transformers' logits for the fixture's tokens against ours, whole sequence and token by token,
// each within 1e-4 of the largest (transformers ran in float32 on the stored weights, bf16 ones
// widened exactly, so every fixture is held to the float32 bound), and transformers' greedy
// continuation, where the fixture has one, through our decode path.
inline void expect_matches_transformers(const std::filesystem::path& dir, HybridModel& m) {
  const nlohmann::json exp = read_json(dir / "expected.json");
  const std::vector<int32_t> toks = exp["tokens"].get<std::vector<int32_t>>();
  const std::vector<float> want = read_f32_file(dir / "logits.f32");
  const int V = m.config().vocab_size;
  ASSERT_EQ(want.size(), toks.size() * size_t(V));
  const double e_full = rel_err(forward_all(m, toks), want);
  const double e_step = rel_err(forward_stepwise(m, toks), want);
  std::printf("%s (stored %s): max|ours - transformers| / max|transformers| = %.3g full forward, %.3g "
              "token by token\n", dir.filename().c_str(), exp["stored_dtype"].get<std::string>().c_str(),
              e_full, e_step);
  EXPECT_LT(e_full, 1e-4);
  EXPECT_LT(e_step, 1e-4);
  if (exp["greedy"].is_null()) return;
  HybridMemory mem(m.backend(), m.config(), 1, int(toks.size()) + 16, KvType::F32);
  std::vector<float> logits;
  Batch b;
  b.add(0, toks);
  m.forward(b, mem, logits);
  std::vector<int> got;
  for (size_t i = 0; i < exp["greedy"].size(); ++i) {
    got.push_back(int(std::max_element(logits.begin(), logits.begin() + V) - logits.begin()));
    Batch d;
    d.add(0, {got.back()});
    m.forward(d, mem, logits);
  }
  EXPECT_EQ(got, exp["greedy"].get<std::vector<int>>());
}

}  // namespace hm::test
