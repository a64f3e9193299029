#include "io/json_read.h"

#include <sys/stat.h>

#include <cerrno>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>
#include <vector>

#include "core/error.h"

namespace hm {

using json = nlohmann::json;

namespace {

// A value as the message shows it: its JSON text, cut short.
std::string shown(const json& v) {
  std::string s = v.dump();
  if (s.size() > 40) s = s.substr(0, 37) + "...";
  return s;
}

// " near field 'k'" when a key has been read, else "".
std::string near(const std::string& key) { return key.empty() ? "" : " near field '" + key + "'"; }

}  // namespace

json parse_json(std::string_view text, const std::string& origin, int max_depth) {
  // The parser itself is iterative; the callback bounds the depth (so later recursive code over
  // the tree cannot overflow the stack), finds repeated keys (the DOM keeps only the last) and
  // remembers the last key, which names the field a syntax error was in.
  std::vector<std::set<std::string>> keys;  // per open container (arrays hold none)
  std::string last_key;
  const json::parser_callback_t on_event = [&](int depth, json::parse_event_t ev, json& parsed) {
    switch (ev) {
      case json::parse_event_t::object_start:
      case json::parse_event_t::array_start:
        HM_CHECK(depth < max_depth, origin, ": JSON nests deeper than ", max_depth, " levels", near(last_key));
        keys.emplace_back();
        break;
      case json::parse_event_t::object_end:
      case json::parse_event_t::array_end:
        if (!keys.empty()) keys.pop_back();
        break;
      case json::parse_event_t::key:
        last_key = parsed.get<std::string>();
        HM_CHECK(keys.empty() || keys.back().insert(last_key).second, origin, ": field '", last_key,
                 "' appears twice in one object");
        break;
      case json::parse_event_t::value:
        break;
    }
    return true;
  };
  try {
    return json::parse(text.begin(), text.end(), on_event);
  } catch (const json::exception& e) {
    throw Error(detail::cat(origin, ": invalid JSON", near(last_key), ": ", e.what()));
  }
}

json parse_json_file(const std::string& path, int64_t max_bytes, int max_depth) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    const int err = errno;
    throw Error(detail::cat(path, ": cannot open: ", std::strerror(err)));
  }
  HM_CHECK(S_ISREG(st.st_mode), path, ": not a regular file");
  HM_CHECK(st.st_size <= max_bytes, path, ": ", st.st_size, " bytes, more than the ", max_bytes,
           " a JSON file may have");
  std::ifstream f(path, std::ios::binary);
  HM_CHECK(f.good(), path, ": cannot open");
  std::string text;
  text.resize(size_t(st.st_size));
  f.read(text.data(), st.st_size);
  HM_CHECK(!f.bad() && f.gcount() == st.st_size, path, ": read error (file changed while reading?)");
  return parse_json(text, path, max_depth);
}

int64_t json_to_int(const json& v, int64_t lo, int64_t hi, const std::string& origin, const std::string& field) {
  // Compared in the type nlohmann holds, before any conversion: a float is never cast.
  bool ok = false;
  int64_t x = 0;
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    ok = hi >= 0 && u <= uint64_t(hi) && (lo <= 0 || u >= uint64_t(lo));
    if (ok) x = int64_t(u);
  } else if (v.is_number_integer()) {
    x = v.get<int64_t>();
    ok = x >= lo && x <= hi;
  }
  HM_CHECK(ok, origin, ": field '", field, "' must be an integer in [", lo, ", ", hi, "], got ",
           v.is_number() ? "" : detail::cat(v.type_name(), " "), shown(v));
  return x;
}

uint64_t json_to_uint64(const json& v, const std::string& origin, const std::string& field) {
  HM_CHECK(v.is_number_unsigned() || (v.is_number_integer() && v.get<int64_t>() >= 0), origin, ": field '",
           field, "' must be an integer in [0, ", UINT64_MAX, "], got ", shown(v));
  return v.get<uint64_t>();
}

double json_to_double(const json& v, double lo, double hi, const std::string& origin, const std::string& field) {
  HM_CHECK(v.is_number(), origin, ": field '", field, "' must be a number, got ", v.type_name(), " ", shown(v));
  const double x = v.get<double>();  // from an integer: rounds, never undefined
  HM_CHECK(std::isfinite(x) && x >= lo && x <= hi, origin, ": field '", field, "' must be in [", lo, ", ", hi,
           "], got ", shown(v));
  return x;
}

JsonFields::JsonFields(const json& obj, std::string origin, std::string prefix)
    : obj_(obj), origin_(std::move(origin)), prefix_(std::move(prefix)) {
  HM_CHECK(obj_.is_object(), origin_, ": ", prefix_.empty() ? "" : detail::cat("field '", prefix_, "' "),
           "must be a JSON object, got ", obj_.type_name());
}

const json& JsonFields::at(const char* key) const {
  const auto it = obj_.find(key);
  HM_CHECK(it != obj_.end(), origin_, ": missing field '", field(key), "'");
  return *it;
}

int64_t JsonFields::get_int(const char* key, int64_t lo, int64_t hi) const {
  return json_to_int(at(key), lo, hi, origin_, field(key));
}

uint64_t JsonFields::get_uint64(const char* key) const { return json_to_uint64(at(key), origin_, field(key)); }

double JsonFields::get_double(const char* key, double lo, double hi) const {
  return json_to_double(at(key), lo, hi, origin_, field(key));
}

float JsonFields::get_float(const char* key) const {
  return static_cast<float>(get_double(key, -double(FLT_MAX), double(FLT_MAX)));
}

bool JsonFields::get_bool(const char* key) const {
  const json& v = at(key);
  HM_CHECK(v.is_boolean(), origin_, ": field '", field(key), "' must be true or false, got ", v.type_name(), " ",
           shown(v));
  return v.get<bool>();
}

std::string JsonFields::get_string(const char* key) const {
  const json& v = at(key);
  HM_CHECK(v.is_string(), origin_, ": field '", field(key), "' must be a string, got ", v.type_name(), " ",
           shown(v));
  return v.get<std::string>();
}

JsonFields JsonFields::object(const char* key) const { return JsonFields(at(key), origin_, field(key)); }

void JsonFields::check_known(std::initializer_list<std::string_view> known) const {
  for (auto it = obj_.begin(); it != obj_.end(); ++it) {
    bool found = false;
    for (std::string_view k : known) found = found || it.key() == k;
    HM_CHECK(found, origin_, ": unknown field '", field(it.key().c_str()), "'");
  }
}

}  // namespace hm
