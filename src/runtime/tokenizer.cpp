#include "runtime/tokenizer.h"

#include <algorithm>
#include <array>
#include <filesystem>
#include <fstream>
#include <map>
#include <queue>
#include <tuple>
#include <nlohmann/json.hpp>
#include <sstream>
#include <system_error>
#include <unordered_map>

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include "core/error.h"
#include "io/atomic_file.h"
#include "io/hf_model.h"
#include "io/json_read.h"
#include "io/paths.h"
#include "runtime/unicode.h"

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

bool Tokenizer::is_eos(int32_t id) const {
  return (id >= 0 && id == eos()) || std::find(more_eos_.begin(), more_eos_.end(), id) != more_eos_.end();
}

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

// ---- SentencePieceTokenizer ----

namespace {

std::string read_whole_file(const fs::path& path, const char* what) {
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  HM_CHECK(st.type() != fs::file_type::not_found, "tokenizer: ", what, " ", path.string(),
           " does not exist");
  HM_CHECK(fs::is_regular_file(st), "tokenizer: ", what, " ", path.string(),
           " is not a regular file");
  // Read whole into memory, so bounded: SentencePiece models are a few megabytes.
  constexpr uintmax_t kMaxBytes = uintmax_t(256) << 20;
  const uintmax_t size = fs::file_size(path, ec);
  HM_CHECK(!ec && size <= kMaxBytes, "tokenizer: ", what, " ", path.string(), " is ", size,
           " bytes, more than the ", kMaxBytes, " allowed");
  std::ifstream f(path, std::ios::binary);
  HM_CHECK(f.good(), "tokenizer: cannot open ", path.string());
  std::ostringstream ss;
  ss << f.rdbuf();
  HM_CHECK(!f.bad(), "tokenizer: failed reading ", path.string());
  return std::move(ss).str();
}

int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

void create_dir(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  HM_CHECK(!ec, "tokenizer: cannot create directory ", dir, ": ", ec.message());
}

// Feeds the trainer one line at a time: SentencePiece trains on sentences, and a line is the
// natural unit of our corpora (strip_brown_tags writes one sentence per line).
class LineIterator : public sentencepiece::SentenceIterator {
 public:
  explicit LineIterator(const std::vector<std::string>& texts) : texts_(texts) { advance(); }
  bool done() const override { return doc_ >= texts_.size(); }
  void Next() override { advance(); }
  const std::string& value() const override { return line_; }
  sentencepiece::util::Status status() const override { return {}; }
  size_t lines() const { return lines_; }

 private:
  void advance() {  // to the next non-empty line
    while (doc_ < texts_.size()) {
      const std::string& t = texts_[doc_];
      if (pos_ >= t.size()) {
        ++doc_, pos_ = 0;
        continue;
      }
      size_t end = t.find('\n', pos_);
      if (end == std::string::npos) end = t.size();
      const size_t start = pos_;
      pos_ = end + 1;
      if (end > start) {
        line_.assign(t, start, end - start);
        ++lines_;
        return;
      }
    }
  }
  const std::vector<std::string>& texts_;
  size_t doc_ = 0, pos_ = 0, lines_ = 0;
  std::string line_;
};

}  // namespace

SentencePieceTokenizer::SentencePieceTokenizer(const std::string& model_file, SpecialIds ids) {
  init(read_whole_file(model_file, "SentencePiece model"), model_file, ids);
}

SentencePieceTokenizer::~SentencePieceTokenizer() = default;

std::unique_ptr<SentencePieceTokenizer> SentencePieceTokenizer::from_serialized(
    std::string model, const std::string& origin, SpecialIds ids) {
  std::unique_ptr<SentencePieceTokenizer> tok(new SentencePieceTokenizer());
  tok->init(std::move(model), origin, ids);
  return tok;
}

void SentencePieceTokenizer::init(std::string model, const std::string& origin, SpecialIds ids) {
  HM_CHECK(!model.empty(), "tokenizer: ", origin, ": empty file, not a SentencePiece model");
  sp_ = std::make_unique<sentencepiece::SentencePieceProcessor>();
  const auto st = sp_->LoadFromSerializedProto(model);
  HM_CHECK(st.ok(), "tokenizer: ", origin, ": not a valid SentencePiece model (", st.ToString(),
           ")");
  const int n = sp_->GetPieceSize();
  HM_CHECK(n > 0, "tokenizer: ", origin, ": SentencePiece model has no pieces");
  overrides_ = ids;
  bos_ = ids.bos >= 0 ? ids.bos : sp_->bos_id();
  eos_ = ids.eos >= 0 ? ids.eos : sp_->eos_id();
  pad_ = ids.pad >= 0 ? ids.pad : sp_->pad_id();
  const bool overridden = ids.bos >= 0 || ids.eos >= 0 || ids.pad >= 0;
  HM_CHECK(bos_ >= 0 && bos_ < n && eos_ >= 0 && eos_ < n && pad_ < n && (pad_ >= 0 || overridden),
           "tokenizer: ", origin, ": SentencePiece model must define bos, eos and pad (got ",
           bos_, ", ", eos_, ", ", pad_, ")", overridden ? " within its " : "",
           overridden ? std::to_string(n) : std::string(), overridden ? " pieces" : "");
  static constexpr std::string_view kMetaSpace = "\xE2\x96\x81";  // U+2581, SentencePiece's space
  pieces_.assign(static_cast<size_t>(n), {});
  for (int id = 0; id < n; ++id) {
    std::string& out = pieces_[static_cast<size_t>(id)];
    if (sp_->IsControl(id)) continue;
    if (sp_->IsUnknown(id)) {
      out = kReplacement;
      continue;
    }
    const std::string& piece = sp_->IdToPiece(id);
    if (sp_->IsByte(id)) {  // "<0xNN>"
      const int hi = piece.size() == 6 ? hex_digit(piece[3]) : -1;
      const int lo = piece.size() == 6 ? hex_digit(piece[4]) : -1;
      HM_CHECK(piece.compare(0, 3, "<0x") == 0 && piece.back() == '>' && hi >= 0 && lo >= 0,
               "tokenizer: ", origin, ": malformed byte piece \"", piece, "\" (id ", id, ")");
      out.assign(1, static_cast<char>(hi * 16 + lo));
      continue;
    }
    for (size_t i = 0; i < piece.size();) {
      if (piece.compare(i, kMetaSpace.size(), kMetaSpace) == 0) {
        out += ' ';
        i += kMetaSpace.size();
      } else {
        out += piece[i++];
      }
    }
  }
  model_ = std::move(model);
  // A dummy prefix shows as "▁" starting the first piece of a text that starts with a letter.
  std::vector<std::string> probe;
  dummy_prefix_ = sp_->Encode("a", &probe).ok() && !probe.empty() && probe[0].compare(0, kMetaSpace.size(), kMetaSpace) == 0;
}

std::string SentencePieceTokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string out = Tokenizer::decode(ids);
  // SentencePiece drops the space its dummy prefix put before the text.
  if (dummy_prefix_ && !out.empty() && out[0] == ' ') out.erase(0, 1);
  return out;
}

std::vector<int32_t> SentencePieceTokenizer::encode(std::string_view text, bool add_bos) const {
  std::vector<int> raw;
  const auto st = sp_->Encode(text, &raw);
  HM_CHECK(st.ok(), "tokenizer: SentencePiece failed to encode text: ", st.ToString());
  std::vector<int32_t> ids;
  ids.reserve(raw.size() + (add_bos ? 1 : 0));
  if (add_bos) ids.push_back(bos_);
  ids.insert(ids.end(), raw.begin(), raw.end());
  return ids;
}

std::string SentencePieceTokenizer::decode_piece(int32_t id) const {
  const int n = vocab_size();
  HM_CHECK(id >= 0 && id < n, "tokenizer: token id ", id, " out of range [0, ", n, ")");
  return pieces_[static_cast<size_t>(id)];
}

void SentencePieceTokenizer::save(const std::string& dir) const {
  create_dir(dir);
  // The model first: tokenizer.json never names a model that is not there yet.
  write_file_atomic((fs::path(dir) / "tokenizer.model").string(), model_);
  nlohmann::json j = {{"type", type()}, {"model", "tokenizer.model"}};
  if (overrides_.bos >= 0) j["bos"] = overrides_.bos;
  if (overrides_.eos >= 0) j["eos"] = overrides_.eos;
  if (overrides_.pad >= 0) j["pad"] = overrides_.pad;
  write_file_atomic((fs::path(dir) / "tokenizer.json").string(), j.dump(2) + "\n");
}

void train_sentencepiece_bpe(const std::vector<std::string>& texts, int vocab_size,
                             const std::string& out_dir) {
  HM_CHECK(vocab_size > 260, "tokenizer: BPE vocab_size must exceed 260 (4 specials and 256 ",
           "byte pieces), got ", vocab_size);
  LineIterator lines(texts);
  HM_CHECK(!lines.done(), "tokenizer: no text to train the BPE tokenizer on");
  const std::unordered_map<std::string, std::string> args = {
      {"model_type", "bpe"},
      {"vocab_size", std::to_string(vocab_size)},
      {"byte_fallback", "true"},
      {"character_coverage", "0.9995"},
      {"pad_id", "0"}, {"unk_id", "1"}, {"bos_id", "2"}, {"eos_id", "3"},
      // Byte-exact round trips: no NFKC, no dummy leading space, runs of spaces kept.
      {"normalization_rule_name", "identity"},
      {"add_dummy_prefix", "false"},
      {"remove_extra_whitespaces", "false"},
      {"allow_whitespace_only_pieces", "true"},
      {"split_digits", "true"},
      // Long paragraphs are not silently dropped (the default limit is 4192 bytes).
      {"max_sentence_length", "1048576"},
      // Determinism: every line, in order, on one thread.
      {"input_sentence_size", "0"},
      {"shuffle_input_sentence", "false"},
      {"num_threads", "1"},
      {"minloglevel", "2"},
  };
  sentencepiece::SetRandomGeneratorSeed(1);  // unused by BPE on unsampled input; pinned anyway
  std::string model;
  const auto st = sentencepiece::SentencePieceTrainer::Train(args, &lines, &model);
  HM_CHECK(st.ok(), "tokenizer: training BPE with vocab_size ", vocab_size, " on ",
           lines.lines(), " lines failed: ", st.ToString());
  SentencePieceTokenizer::from_serialized(std::move(model), "trained BPE model")->save(out_dir);
}

// ---- loading ----

namespace {

constexpr int64_t kMaxTokenizerVocab = int64_t(1) << 24;  // the model's bound (config.h kMaxVocab)

// A checkpoint trained on a synthetic task has no tokenizer: its token ids are task symbols,
// which any text tokenizer would decode silently wrong. Its trainer_state.json names the task.
void check_not_task_checkpoint(const std::string& dir) {
  const fs::path state = fs::path(dir) / "trainer_state.json";
  if (!fs::exists(state)) return;
  const nlohmann::json j = parse_json_file(state.string());
  if (!j.is_object() || !j.contains("settings") || !j["settings"].is_object()) return;
  const auto& task = j["settings"].value("task", nlohmann::json());
  if (!task.is_object() || !task.value("name", nlohmann::json()).is_string()) return;
  const std::string name = task["name"].get<std::string>();
  HM_CHECK(name.empty(), dir, " was trained on the synthetic task '", name,
           "': its tokens are task ids, not text, so it has no tokenizer and cannot read or "
           "write text; score it with `hm eval --model ", dir, " --task ", name, "`");
}
}  // namespace

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& dir) {
  const fs::path path = fs::path(dir) / "tokenizer.json";
  const std::string name = path.string();
  std::error_code ec;
  // A Hugging Face folder's special ids live in its config.json; eos may be a list there or in
  // generation_config.json (more_eos).
  std::vector<int32_t> more_eos;
  auto eos_list = [&](const nlohmann::json& v, const std::string& file) {
    std::vector<int32_t> out;
    if (v.is_number_integer()) out.push_back(int32_t(json_to_int(v, 0, kMaxTokenizerVocab - 1, file, "eos_token_id")));
    if (v.is_array())
      for (const auto& e : v) out.push_back(int32_t(json_to_int(e, 0, kMaxTokenizerVocab - 1, file, "eos_token_id")));
    return out;
  };
  auto config_ids = [&] {
    SpecialIds ids;
    const fs::path cfg = fs::path(dir) / "config.json";
    if (!fs::is_regular_file(cfg, ec)) return ids;
    const nlohmann::json c = parse_hf_json_file(cfg.string());  // may hold Python's Infinity
    int* dst[3] = {&ids.bos, &ids.eos, &ids.pad};
    const char* keys[3] = {"bos_token_id", "eos_token_id", "pad_token_id"};
    for (int k = 0; k < 3; ++k)
      if (c.is_object() && c.contains(keys[k]) && c[keys[k]].is_number_integer())
        *dst[k] = int(json_to_int(c[keys[k]], 0, kMaxTokenizerVocab - 1, cfg.string(), keys[k]));
    if (c.is_object() && c.contains("eos_token_id") && c["eos_token_id"].is_array()) {
      more_eos = eos_list(c["eos_token_id"], cfg.string());
      if (!more_eos.empty()) ids.eos = more_eos[0];
    }
    const fs::path gen = fs::path(dir) / "generation_config.json";
    if (fs::is_regular_file(gen, ec)) {
      const nlohmann::json g = parse_hf_json_file(gen.string());
      if (g.is_object() && g.contains("eos_token_id"))
        for (int32_t id : eos_list(g["eos_token_id"], gen.string())) more_eos.push_back(id);
    }
    return ids;
  };
  auto with_more = [&](std::unique_ptr<Tokenizer> t) {
    std::vector<int32_t> keep;
    for (int32_t id : more_eos)
      if (id != t->eos() && std::find(keep.begin(), keep.end(), id) == keep.end()) {
        HM_CHECK(id < t->vocab_size(), "tokenizer: ", dir, ": eos_token_id ", id, " is outside the tokenizer's ",
                 t->vocab_size(), " ids");
        keep.push_back(id);
      }
    t->set_more_eos(std::move(keep));
    return t;
  };
  if (fs::status(path, ec).type() == fs::file_type::not_found) {
    const fs::path spm = fs::path(dir) / "tokenizer.model";
    if (fs::is_regular_file(fs::path(dir) / "config.json", ec) && fs::exists(spm, ec)) {
      const SpecialIds ids = config_ids();
      return with_more(std::make_unique<SentencePieceTokenizer>(spm.string(), ids));
    }
    check_not_task_checkpoint(dir);
    // No quiet switch to bytes: a BPE model decoded as bytes prints control characters.
    throw Error(detail::cat("tokenizer: ", name, " does not exist; every checkpoint names its tokenizer ",
                            "there (hm init and hm train write it). For a byte-level model, write ",
                            "{\"type\": \"byte\"} to it"));
  }
  const nlohmann::json doc = parse_json_file(name);
  if (doc.is_object() && doc.contains("model") && doc["model"].is_object()) {
    // A Hugging Face tokenizer.json.
    const SpecialIds ids = config_ids();
    return with_more(
        std::make_unique<HfBpeTokenizer>(read_whole_file(path, "tokenizer.json"), name, ids.bos, ids.eos, ids.pad));
  }
  const JsonFields j(doc, name);
  j.check_known({"type", "model", "bos", "eos", "pad"});
  const std::string type = j.get_string("type");
  if (type == "byte") {
    for (const char* k : {"model", "bos", "eos", "pad"})
      HM_CHECK(!j.has(k), "tokenizer: ", name, ": field '", k, "' does not apply to type \"byte\"");
    return std::make_unique<ByteTokenizer>();
  }
  if (type == "sentencepiece") {
    const std::string model = j.has("model") ? j.get_string("model") : "tokenizer.model";
    const std::string model_path = file_inside_dir(dir, model, name, "model");
    HM_CHECK(fs::exists(model_path, ec), "tokenizer: ", name, ": field 'model': sentencepiece ",
             "model ", model_path, " does not exist");
    SpecialIds ids;
    if (j.has("bos")) ids.bos = int(j.get_int("bos", 0, kMaxTokenizerVocab - 1));
    if (j.has("eos")) ids.eos = int(j.get_int("eos", 0, kMaxTokenizerVocab - 1));
    if (j.has("pad")) ids.pad = int(j.get_int("pad", 0, kMaxTokenizerVocab - 1));
    return std::make_unique<SentencePieceTokenizer>(model_path, ids);
  }
  throw Error("tokenizer: " + name + ": field 'type': unknown tokenizer type \"" + type +
              "\" (expected \"byte\" or \"sentencepiece\")");
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

bool is_valid_utf8(std::string_view s) { return utf8_error_offset(s) == std::string_view::npos; }

size_t utf8_error_offset(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const Seq seq = examine(s, i);
    if (!seq.valid) return i;
    i += seq.len;
  }
  return std::string_view::npos;
}

}  // namespace hm
