#include "runtime/tokenizer.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <system_error>

#include "core/error.h"
#include "io/atomic_file.h"

namespace hm {

namespace fs = std::filesystem;

namespace {

constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD

// Examines the UTF-8 sequence starting at in[i] (Unicode Table 3-7, so overlongs,
// surrogates and code points above U+10FFFF are ill-formed).
struct Seq {
  size_t len;      // bytes examined: the whole character, or the maximal ill-formed subpart
  bool valid;      // a complete well-formed character
  bool truncated;  // not valid only because in ended too soon
};

Seq examine(std::string_view in, size_t i) {
  const auto b = static_cast<unsigned char>(in[i]);
  if (b < 0x80) return {1, true, false};
  size_t need;
  unsigned char lo = 0x80, hi = 0xBF;  // range of the second byte
  if (b >= 0xC2 && b <= 0xDF) {
    need = 2;
  } else if (b == 0xE0) {
    need = 3; lo = 0xA0;
  } else if ((b >= 0xE1 && b <= 0xEC) || b == 0xEE || b == 0xEF) {
    need = 3;
  } else if (b == 0xED) {
    need = 3; hi = 0x9F;
  } else if (b == 0xF0) {
    need = 4; lo = 0x90;
  } else if (b >= 0xF1 && b <= 0xF3) {
    need = 4;
  } else if (b == 0xF4) {
    need = 4; hi = 0x8F;
  } else {
    return {1, false, false};  // continuation byte or a byte that never starts a character
  }
  size_t k = 1;
  while (k < need && i + k < in.size()) {
    const auto c = static_cast<unsigned char>(in[i + k]);
    const bool ok = k == 1 ? (c >= lo && c <= hi) : (c >= 0x80 && c <= 0xBF);
    if (!ok) break;
    ++k;
  }
  if (k == need) return {need, true, false};
  return {k, false, i + k == in.size()};
}

// Appends in to out as valid UTF-8. Returns the bytes consumed: all of in, unless !final and
// in ends with a sequence that is incomplete but may still become valid.
size_t append_sanitized(std::string_view in, bool final, std::string& out) {
  size_t i = 0;
  while (i < in.size()) {
    const Seq s = examine(in, i);
    if (s.valid) {
      out.append(in.substr(i, s.len));
    } else if (s.truncated && !final) {
      return i;
    } else {
      out.append(kReplacement);
    }
    i += s.len;
  }
  return in.size();
}

}  // namespace

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string out;
  for (int32_t id : ids) out += decode_piece(id);
  return out;
}

// ---- ByteTokenizer ----

std::vector<int32_t> ByteTokenizer::encode(std::string_view text, bool add_bos) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size() + (add_bos ? 1 : 0));
  if (add_bos) ids.push_back(kBos);
  for (char ch : text) ids.push_back(static_cast<unsigned char>(ch));
  return ids;
}

std::string ByteTokenizer::decode_piece(int32_t id) const {
  HM_CHECK(id >= 0 && id < kVocab, "tokenizer: token id ", id, " out of range [0, ", kVocab, ")");
  if (id >= 256) return {};
  return std::string(1, static_cast<char>(static_cast<unsigned char>(id)));
}

void ByteTokenizer::save(const std::string& dir) const {
  std::error_code ec;
  fs::create_directories(dir, ec);
  HM_CHECK(!ec, "tokenizer: cannot create directory ", dir, ": ", ec.message());
  const nlohmann::json j = {{"type", type()}};
  write_file_atomic((fs::path(dir) / "tokenizer.json").string(), j.dump(2) + "\n");
}

// ---- loading ----

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& dir) {
  const fs::path path = fs::path(dir) / "tokenizer.json";
  const std::string name = path.string();
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (st.type() == fs::file_type::not_found) return std::make_unique<ByteTokenizer>();
  HM_CHECK(!ec, "tokenizer: cannot stat ", name, ": ", ec.message());
  HM_CHECK(fs::is_regular_file(st), "tokenizer: ", name, " is not a regular file");

  std::ifstream f(path, std::ios::binary);
  HM_CHECK(f.good(), "tokenizer: cannot open ", name);
  std::ostringstream text;
  text << f.rdbuf();
  HM_CHECK(!f.bad(), "tokenizer: failed reading ", name);

  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text.str());
  } catch (const nlohmann::json::exception& e) {
    throw Error("tokenizer: " + name + ": malformed JSON: " + e.what());
  }
  HM_CHECK(j.is_object(), "tokenizer: ", name, ": expected a JSON object");
  const auto it = j.find("type");
  HM_CHECK(it != j.end(), "tokenizer: ", name, ": field \"type\" is missing");
  HM_CHECK(it->is_string(), "tokenizer: ", name, ": field \"type\" must be a string");
  const std::string type = it->get<std::string>();
  if (type == "byte") return std::make_unique<ByteTokenizer>();
  HM_CHECK(type != "sentencepiece", "tokenizer: ", name,
           ": field \"type\": \"sentencepiece\" is not supported yet");
  throw Error("tokenizer: " + name + ": field \"type\": unknown tokenizer type \"" + type +
              "\" (expected \"byte\")");
}

// ---- UTF-8 ----

std::string Utf8StreamDecoder::push(int32_t id) {
  pending_ += tok_.decode_piece(id);
  std::string out;
  const size_t used = append_sanitized(pending_, /*final=*/false, out);
  pending_.erase(0, used);
  return out;
}

std::string Utf8StreamDecoder::flush() {
  std::string out;
  append_sanitized(pending_, /*final=*/true, out);
  pending_.clear();
  return out;
}

bool is_valid_utf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const Seq seq = examine(s, i);
    if (!seq.valid) return false;
    i += seq.len;
  }
  return true;
}

}  // namespace hm
