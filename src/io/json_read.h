// The one way the engine reads JSON it did not just write itself (config.json, tokenizer.json,
// trainer_state.json, safetensors headers, hm compare's result.json): bounded size and nesting,
// no duplicate keys, and typed conversions that check range before converting, so a huge
// number is an error naming the file and the field, never undefined behaviour.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace hm {

// Deep enough for every format we read (the deepest, trainer_state.json, nests 4 levels), and
// shallow enough that recursive code over the tree (dump, ==) cannot exhaust the stack.
constexpr int kJsonMaxDepth = 64;
// Our JSON files are kilobytes; a Hugging Face tokenizer.json is tens of megabytes.
constexpr int64_t kJsonMaxFileBytes = int64_t(64) << 20;

// Parses text; `origin` (a path, or "safetensors header of PATH") starts every message.
// hm::Error for malformed JSON (naming the field being read when parsing stopped), nesting
// deeper than max_depth, or a key repeated within one object.
nlohmann::json parse_json(std::string_view text, const std::string& origin, int max_depth = kJsonMaxDepth);
// Reads path (a regular file of at most max_bytes) and parses it as above.
nlohmann::json parse_json_file(const std::string& path, int64_t max_bytes = kJsonMaxFileBytes,
                               int max_depth = kJsonMaxDepth);

// Conversions of one value; `origin` and `field` name it in the message
// ("PATH: field 'settings.steps' must be an integer in [0, 9223372036854775807], got 1e+300").
int64_t json_to_int(const nlohmann::json& v, int64_t lo, int64_t hi, const std::string& origin,
                    const std::string& field);
uint64_t json_to_uint64(const nlohmann::json& v, const std::string& origin, const std::string& field);
// Finite and in [lo, hi].
double json_to_double(const nlohmann::json& v, double lo, double hi, const std::string& origin,
                      const std::string& field);

// Typed, range-checked access to the fields of one JSON object.
class JsonFields {
 public:
  // hm::Error unless obj is an object. prefix: the object's own path ("settings"), "" at the top.
  JsonFields(const nlohmann::json& obj, std::string origin, std::string prefix = "");
  // Holds a reference: the object must outlive it, so a temporary is refused at compile time.
  JsonFields(nlohmann::json&& obj, std::string origin, std::string prefix = "") = delete;

  bool has(const char* key) const { return obj_.contains(key); }
  const nlohmann::json& at(const char* key) const;  // hm::Error "missing field"
  int64_t get_int(const char* key, int64_t lo, int64_t hi) const;
  int get_int32(const char* key) const { return int(get_int(key, INT32_MIN, INT32_MAX)); }
  uint64_t get_uint64(const char* key) const;
  double get_double(const char* key, double lo, double hi) const;
  float get_float(const char* key) const;  // finite and representable as float
  bool get_bool(const char* key) const;
  std::string get_string(const char* key) const;
  JsonFields object(const char* key) const;
  // hm::Error naming the first key not in `known`.
  void check_known(std::initializer_list<std::string_view> known) const;

  std::string field(const char* key) const { return prefix_.empty() ? key : prefix_ + "." + key; }
  const std::string& origin() const { return origin_; }
  const nlohmann::json& value() const { return obj_; }

 private:
  const nlohmann::json& obj_;
  std::string origin_, prefix_;
};

}  // namespace hm
