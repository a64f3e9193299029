// File helpers of the Hugging Face tests (test_hf.cpp, test_bamba.cpp): fixture folders hold
// config.json, expected.json and transformers' logits as raw little-endian float32.
#pragma once
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

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

}  // namespace hm::test
