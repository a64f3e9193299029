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

SentencePieceTokenizer::SentencePieceTokenizer(const std::string& model_file) {
  init(read_whole_file(model_file, "SentencePiece model"), model_file);
}

SentencePieceTokenizer::~SentencePieceTokenizer() = default;

std::unique_ptr<SentencePieceTokenizer> SentencePieceTokenizer::from_serialized(
    std::string model, const std::string& origin) {
  std::unique_ptr<SentencePieceTokenizer> tok(new SentencePieceTokenizer());
  tok->init(std::move(model), origin);
  return tok;
}

void SentencePieceTokenizer::init(std::string model, const std::string& origin) {
  HM_CHECK(!model.empty(), "tokenizer: ", origin, ": empty file, not a SentencePiece model");
  sp_ = std::make_unique<sentencepiece::SentencePieceProcessor>();
  const auto st = sp_->LoadFromSerializedProto(model);
  HM_CHECK(st.ok(), "tokenizer: ", origin, ": not a valid SentencePiece model (", st.ToString(),
           ")");
  const int n = sp_->GetPieceSize();
  HM_CHECK(n > 0, "tokenizer: ", origin, ": SentencePiece model has no pieces");
  bos_ = sp_->bos_id(), eos_ = sp_->eos_id(), pad_ = sp_->pad_id();
  HM_CHECK(bos_ >= 0 && bos_ < n && eos_ >= 0 && eos_ < n && pad_ >= 0 && pad_ < n,
           "tokenizer: ", origin, ": SentencePiece model must define bos, eos and pad (got ",
           bos_, ", ", eos_, ", ", pad_, ")");
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
  const nlohmann::json j = {{"type", type()}, {"model", "tokenizer.model"}};
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

// ---- Hugging Face byte-level BPE ----

namespace {

constexpr int64_t kMaxTokenizerVocab = int64_t(1) << 24;  // the model's bound (config.h kMaxVocab)

struct CodeRange { char32_t lo, hi; };
struct ClassRange { char32_t lo, hi; int cls; };
struct Decomposition { char32_t cp; uint16_t offset, len; };
struct Composition { char32_t first, second, composed; };
#include "runtime/unicode_tables.inc"

template <size_t N>
bool in_ranges(const CodeRange (&r)[N], char32_t c) {
  const auto it = std::upper_bound(std::begin(r), std::end(r), c,
                                   [](char32_t v, const CodeRange& x) { return v < x.lo; });
  return it != std::begin(r) && c <= std::prev(it)->hi;
}
bool is_letter(char32_t c) { return c < 0x80 ? ((c | 0x20) >= 'a' && (c | 0x20) <= 'z') : in_ranges(kLetterRanges, c); }
bool is_number(char32_t c) { return c < 0x80 ? (c >= '0' && c <= '9') : in_ranges(kNumberRanges, c); }
// The regex crate's \s: Unicode White_Space.
bool is_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}
int combining_class(char32_t c) {
  if (c < 0x300) return 0;
  const auto it = std::upper_bound(std::begin(kCombiningClass), std::end(kCombiningClass), c,
                                   [](char32_t v, const ClassRange& x) { return v < x.lo; });
  return it != std::begin(kCombiningClass) && c <= std::prev(it)->hi ? std::prev(it)->cls : 0;
}

// Decodes valid UTF-8 (the caller checked) into code points with their byte offsets.
void to_code_points(std::string_view s, std::vector<char32_t>& cps, std::vector<size_t>* offsets) {
  for (size_t i = 0; i < s.size();) {
    const auto b = static_cast<unsigned char>(s[i]);
    const size_t n = b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4;
    char32_t c = n == 1 ? b : n == 2 ? (b & 0x1F) : n == 3 ? (b & 0x0F) : (b & 0x07);
    for (size_t k = 1; k < n; ++k) c = (c << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
    if (offsets) offsets->push_back(i);
    cps.push_back(c);
    i += n;
  }
  if (offsets) offsets->push_back(s.size());
}

void append_utf8(std::string& out, char32_t c) {
  if (c < 0x80) {
    out += char(c);
  } else if (c < 0x800) {
    out += char(0xC0 | (c >> 6)), out += char(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    out += char(0xE0 | (c >> 12)), out += char(0x80 | ((c >> 6) & 0x3F)), out += char(0x80 | (c & 0x3F));
  } else {
    out += char(0xF0 | (c >> 18)), out += char(0x80 | ((c >> 12) & 0x3F));
    out += char(0x80 | ((c >> 6) & 0x3F)), out += char(0x80 | (c & 0x3F));
  }
}

// Hangul syllables compose and decompose by arithmetic (Unicode 3.12).
constexpr char32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr int kLCount = 19, kVCount = 21, kTCount = 28, kNCount = kVCount * kTCount, kSCount = kLCount * kNCount;

char32_t compose_pair(char32_t a, char32_t b) {
  if (a >= kLBase && a < kLBase + kLCount && b >= kVBase && b < kVBase + kVCount)
    return kSBase + ((a - kLBase) * kVCount + (b - kVBase)) * kTCount;
  if (a >= kSBase && a < kSBase + kSCount && (a - kSBase) % kTCount == 0 && b > kTBase && b < kTBase + kTCount)
    return a + (b - kTBase);
  const Composition key{a, b, 0};
  const auto it = std::lower_bound(std::begin(kCompose), std::end(kCompose), key, [](const Composition& x, const Composition& y) {
    return x.first != y.first ? x.first < y.first : x.second < y.second;
  });
  return it != std::end(kCompose) && it->first == a && it->second == b ? it->composed : 0;
}

}  // namespace

std::string nfc(std::string_view text) {
  // Fast path: below U+0300 every character is its own NFC and none combines.
  bool simple = true;
  for (char ch : text) simple = simple && static_cast<unsigned char>(ch) < 0xCC;
  if (simple) return std::string(text);
  std::vector<char32_t> in, d;
  to_code_points(text, in, nullptr);
  for (char32_t c : in) {  // canonical decomposition
    if (c >= kSBase && c < kSBase + kSCount) {
      const int s = int(c - kSBase);
      d.push_back(kLBase + s / kNCount);
      d.push_back(kVBase + (s % kNCount) / kTCount);
      if (s % kTCount) d.push_back(kTBase + s % kTCount);
      continue;
    }
    const auto it = std::lower_bound(std::begin(kDecomp), std::end(kDecomp), c,
                                     [](const Decomposition& x, char32_t v) { return x.cp < v; });
    if (it != std::end(kDecomp) && it->cp == c)
      d.insert(d.end(), kDecompPool + it->offset, kDecompPool + it->offset + it->len);
    else
      d.push_back(c);
  }
  // Canonical ordering: a stable sort of each run of non-starters by combining class.
  for (size_t i = 1; i < d.size(); ++i)
    for (size_t k = i; k > 0; --k) {
      const int a = combining_class(d[k - 1]), b = combining_class(d[k]);
      if (b == 0 || a <= b) break;
      std::swap(d[k - 1], d[k]);
    }
  // Canonical composition: each character joins the last starter unless blocked.
  std::vector<char32_t> out;
  int starter = -1, last_class = -1;
  for (char32_t c : d) {
    const int cls = combining_class(c);
    // Not blocked: nothing between the starter and c, or everything between has a lower class.
    if (starter >= 0 && (last_class < cls || last_class == 0)) {
      if (const char32_t comp = compose_pair(out[size_t(starter)], c); comp != 0) {
        out[size_t(starter)] = comp;
        continue;
      }
    }
    if (cls == 0) starter = int(out.size());
    last_class = cls;
    out.push_back(c);
  }
  std::string s;
  s.reserve(text.size());
  for (char32_t c : out) append_utf8(s, c);
  return s;
}

std::vector<std::string_view> gpt2_split(std::string_view text) {
  std::vector<char32_t> cp;
  std::vector<size_t> off;
  to_code_points(text, cp, &off);
  const size_t n = cp.size();
  std::vector<std::string_view> out;
  auto emit = [&](size_t a, size_t b) { out.push_back(text.substr(off[a], off[b] - off[a])); };
  auto other = [](char32_t c) { return !is_space(c) && !is_letter(c) && !is_number(c); };
  size_t i = 0;
  while (i < n) {
    // 's|'t|'re|'ve|'m|'ll|'d (case-sensitive, as in the pattern)
    if (cp[i] == '\'' && i + 1 < n) {
      const char32_t a = cp[i + 1], b = i + 2 < n ? cp[i + 2] : 0;
      size_t len = 0;
      if (a == 's' || a == 't' || a == 'm' || a == 'd') len = 2;
      else if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) len = 3;
      if (len) {
        emit(i, i + len);
        i += len;
        continue;
      }
    }
    // ' ?X+' for X in letters, numbers, others: an optional ASCII space, then a run of one class.
    const size_t j = cp[i] == ' ' && i + 1 < n ? i + 1 : i;
    bool (*cls)(char32_t) = nullptr;
    if (is_letter(cp[j])) cls = is_letter;
    else if (is_number(cp[j])) cls = is_number;
    else if (other(cp[j])) cls = +[](char32_t c) { return !is_space(c) && !is_letter(c) && !is_number(c); };
    if (cls) {
      size_t k = j + 1;
      while (k < n && cls(cp[k])) ++k;
      emit(i, k);
      i = k;
      continue;
    }
    // \s+(?!\S) then \s+: a whitespace run, less its last character when a non-space follows
    // (that character then starts the next piece, e.g. as the space of ' ?\p{L}+').
    size_t k = i;
    while (k < n && is_space(cp[k])) ++k;
    if (k < n && k - i > 1) --k;
    emit(i, k);
    i = k;
  }
  return out;
}

struct HfBpeTokenizer::Impl {
  struct Added {
    std::string content;
    int32_t id;
    bool special, normalized;
  };
  std::unordered_map<std::string, int32_t> vocab;
  std::vector<std::string> pieces;       // id -> decoded bytes ("" for specials)
  std::vector<bool> has_token;           // id -> the file defines it
  std::vector<Added> added;              // longest first: the first match at a position wins
  std::map<std::pair<int32_t, int32_t>, std::pair<int, int32_t>> merges;  // pair -> (rank, merged id)
  int32_t byte_id[256];                  // the vocabulary id of each byte's symbol
  bool nfc = false, add_prefix_space = false, use_regex = true, ignore_merges = false;

  // Byte-level BPE of one pre-token: merges applied lowest rank first (leftmost among equals),
  // as tokenizers' Word::merge_all does, with a heap so a long word costs O(n log n).
  void bpe(std::string_view word, std::vector<int32_t>& ids) const {
    if (ignore_merges) {
      std::string mapped;
      for (char ch : word) mapped += kByteSymbol[static_cast<unsigned char>(ch)];
      if (auto it = vocab.find(mapped); it != vocab.end()) {
        ids.push_back(it->second);
        return;
      }
    }
    const int n = int(word.size());
    const size_t un = static_cast<size_t>(n);
    std::vector<int32_t> sym(un);
    std::vector<int> next(un), prev(un);
    for (int i = 0; i < n; ++i) {
      sym[size_t(i)] = byte_id[static_cast<unsigned char>(word[size_t(i)])];
      next[size_t(i)] = i + 1 < n ? i + 1 : -1;
      prev[size_t(i)] = i - 1;
    }
    using Entry = std::tuple<int, int, int32_t, int32_t>;  // rank, position, left id, right id
    std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
    auto push = [&](int i) {
      if (i < 0 || next[size_t(i)] < 0) return;
      const auto it = merges.find({sym[size_t(i)], sym[size_t(next[size_t(i)])]});
      if (it != merges.end()) heap.emplace(it->second.first, i, sym[size_t(i)], sym[size_t(next[size_t(i)])]);
    };
    for (int i = 0; i + 1 < n; ++i) push(i);
    std::vector<bool> dead(un, false);
    while (!heap.empty()) {
      const auto [rank, i, a, b] = heap.top();
      heap.pop();
      const int j = next[size_t(i)];
      if (dead[size_t(i)] || j < 0 || sym[size_t(i)] != a || sym[size_t(j)] != b) continue;  // stale
      sym[size_t(i)] = merges.at({a, b}).second;
      dead[size_t(j)] = true;
      next[size_t(i)] = next[size_t(j)];
      if (next[size_t(j)] >= 0) prev[size_t(next[size_t(j)])] = i;
      push(prev[size_t(i)]);
      push(i);
    }
    for (int i = 0; i >= 0 && i < n; i = next[size_t(i)]) ids.push_back(sym[size_t(i)]);
  }

  // Pre-tokenizes and encodes text with no added tokens in it.
  void encode_plain(std::string_view text, std::vector<int32_t>& ids) const {
    if (text.empty()) return;
    std::string buf;
    if (add_prefix_space && text[0] != ' ') {
      buf = " ";
      buf += text;
      text = buf;
    }
    if (!use_regex) return bpe(text, ids);
    for (std::string_view w : gpt2_split(text)) bpe(w, ids);
  }

  // Splits text on the added tokens of one kind (normalized or not), leftmost-longest; `rest`
  // handles the text between them.
  template <class F>
  void split_added(std::string_view text, bool normalized, std::vector<int32_t>& ids, F&& rest) const {
    size_t start = 0;
    for (size_t i = 0; i < text.size();) {
      const Added* hit = nullptr;
      for (const Added& a : added)
        if (a.normalized == normalized && text.compare(i, a.content.size(), a.content) == 0) {
          hit = &a;
          break;
        }
      if (!hit) {
        ++i;
        continue;
      }
      rest(text.substr(start, i - start));
      ids.push_back(hit->id);
      i += hit->content.size();
      start = i;
    }
    rest(text.substr(start));
  }

  static const std::array<std::string, 256> kByteSymbol;
};

namespace {
// GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the other 68 bytes
// for U+0100.. in byte order, so every byte is one visible character.
std::array<std::string, 256> make_byte_symbols() {
  std::array<std::string, 256> t;
  char32_t next = 0x100;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    append_utf8(t[size_t(b)], printable ? char32_t(b) : next++);
  }
  return t;
}
}  // namespace

const std::array<std::string, 256> HfBpeTokenizer::Impl::kByteSymbol = make_byte_symbols();

HfBpeTokenizer::~HfBpeTokenizer() = default;

HfBpeTokenizer::HfBpeTokenizer(std::string text, const std::string& origin, int bos, int eos, int pad)
    : text_(std::move(text)), impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  const nlohmann::json doc = parse_json(text_, origin);
  const JsonFields j(doc, origin);
  auto refuse = [&](const std::string& field, const nlohmann::json& v, const char* why) {
    throw Error(detail::cat("tokenizer: ", origin, ": field '", field, "' is ", v.dump(), ": ", why));
  };
  auto type_of = [&](const JsonFields& f) { return f.has("type") ? f.get_string("type") : std::string(); };
  if (j.has("truncation") && !j.at("truncation").is_null())
    refuse("truncation", j.at("truncation"), "truncation is not supported (encode returns every token)");
  // Normalizer: none, or NFC (GPT-NeoX's).
  if (j.has("normalizer") && !j.at("normalizer").is_null()) {
    const JsonFields f = j.object("normalizer");
    if (type_of(f) != "NFC") refuse("normalizer", f.value(), "only null or {\"type\": \"NFC\"} is supported");
    m.nfc = true;
  }
  // Pre-tokenizer: ByteLevel.
  {
    const JsonFields f = j.object("pre_tokenizer");
    if (type_of(f) != "ByteLevel")
      refuse("pre_tokenizer", f.value(), "only {\"type\": \"ByteLevel\"} is supported (Split and Sequence "
             "pre-tokenizers, e.g. Llama 3's, are not yet)");
    if (f.has("add_prefix_space")) m.add_prefix_space = f.get_bool("add_prefix_space");
    if (f.has("use_regex")) m.use_regex = f.get_bool("use_regex");
  }
  if (j.has("post_processor") && !j.at("post_processor").is_null()) {
    const JsonFields f = j.object("post_processor");
    if (type_of(f) != "ByteLevel")  // ByteLevel's post-processor only trims offsets
      refuse("post_processor", f.value(), "only null or ByteLevel is supported (templates that add tokens are not)");
  }
  {
    const JsonFields f = j.object("decoder");
    if (type_of(f) != "ByteLevel") refuse("decoder", f.value(), "only {\"type\": \"ByteLevel\"} is supported");
  }
  // Model: byte-level BPE.
  const JsonFields mf = j.object("model");
  if (type_of(mf) != "BPE") refuse("model.type", mf.has("type") ? mf.at("type") : nlohmann::json(), "only BPE is supported");
  for (const char* k : {"dropout", "continuing_subword_prefix", "end_of_word_suffix"})
    if (mf.has(k) && !mf.at(k).is_null()) refuse(mf.field(k), mf.at(k), "not supported");
  if (mf.has("byte_fallback") && mf.get_bool("byte_fallback"))
    refuse("model.byte_fallback", true, "not supported (byte-level BPE needs none)");
  if (mf.has("ignore_merges")) m.ignore_merges = mf.get_bool("ignore_merges");
  const nlohmann::json& vocab = mf.at("vocab");
  HM_CHECK(vocab.is_object(), "tokenizer: ", origin, ": field 'model.vocab' must be an object, got ", vocab.type_name());
  int32_t max_id = -1;
  auto define = [&](const std::string& tok, int64_t id64, const std::string& field) {
    HM_CHECK(id64 >= 0 && id64 < kMaxTokenizerVocab, "tokenizer: ", origin, ": field '", field,
             "' must be an id in [0, ", kMaxTokenizerVocab, "), got ", id64);
    const auto id = int32_t(id64);
    max_id = std::max(max_id, id);
    if (size_t(id) >= m.pieces.size()) {
      m.pieces.resize(size_t(id) + 1);
      m.has_token.resize(size_t(id) + 1, false);
    }
    m.has_token[size_t(id)] = true;
    // ByteLevel decoding: each character back to its byte; a token with a character outside the
    // byte alphabet (an added token like "    ") is kept as its own UTF-8, as tokenizers does.
    static const std::unordered_map<std::string, char> sym_to_byte = [] {
      std::unordered_map<std::string, char> r;
      for (int b = 0; b < 256; ++b) r[Impl::kByteSymbol[size_t(b)]] = char(b);
      return r;
    }();
    std::vector<char32_t> cps;
    std::vector<size_t> off;
    HM_CHECK(is_valid_utf8(tok), "tokenizer: ", origin, ": token of id ", id, " is not valid UTF-8");
    to_code_points(tok, cps, &off);
    std::string bytes;
    bool all = true;
    for (size_t k = 0; k < cps.size() && all; ++k) {
      auto it = sym_to_byte.find(tok.substr(off[k], off[k + 1] - off[k]));
      if (it == sym_to_byte.end()) all = false;
      else bytes += it->second;
    }
    m.pieces[size_t(id)] = all ? bytes : tok;
  };
  for (const auto& [tok, id] : vocab.items()) {
    define(tok, json_to_int(id, 0, kMaxTokenizerVocab - 1, origin, "model.vocab." + tok), "model.vocab." + tok);
    m.vocab.emplace(tok, int32_t(id.get<int64_t>()));
  }
  for (int b = 0; b < 256; ++b) {
    auto it = m.vocab.find(Impl::kByteSymbol[size_t(b)]);
    HM_CHECK(it != m.vocab.end(), "tokenizer: ", origin, ": field 'model.vocab' lacks the byte-level symbol of byte ",
             b, " (\"", Impl::kByteSymbol[size_t(b)], "\"): not a byte-level BPE vocabulary");
    m.byte_id[b] = it->second;
  }
  const nlohmann::json& merges = mf.at("merges");
  HM_CHECK(merges.is_array(), "tokenizer: ", origin, ": field 'model.merges' must be a list, got ", merges.type_name());
  for (size_t r = 0; r < merges.size(); ++r) {
    const nlohmann::json& e = merges[r];
    const std::string field = detail::cat("model.merges[", r, "]");
    std::string a, b;
    if (e.is_string()) {  // "a b"
      const std::string s = e.get<std::string>();
      const size_t sp = s.find(' ');
      HM_CHECK(sp != std::string::npos && sp > 0 && sp + 1 < s.size() && s.find(' ', sp + 1) == std::string::npos,
               "tokenizer: ", origin, ": field '", field, "' must be two tokens separated by one space, got \"", s, "\"");
      a = s.substr(0, sp), b = s.substr(sp + 1);
    } else {  // ["a", "b"]
      HM_CHECK(e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string(), "tokenizer: ", origin,
               ": field '", field, "' must be \"a b\" or [\"a\", \"b\"], got ", e.dump());
      a = e[0].get<std::string>(), b = e[1].get<std::string>();
    }
    const auto ia = m.vocab.find(a), ib = m.vocab.find(b), iab = m.vocab.find(a + b);
    HM_CHECK(ia != m.vocab.end() && ib != m.vocab.end() && iab != m.vocab.end(), "tokenizer: ", origin, ": field '",
             field, "' merges \"", a, "\" and \"", b, "\", but the vocabulary lacks one of them or their merge");
    m.merges.emplace(std::make_pair(ia->second, ib->second), std::make_pair(int(r), iab->second));  // first rank wins
  }
  // Added tokens.
  if (j.has("added_tokens")) {
    const nlohmann::json& at = j.at("added_tokens");
    HM_CHECK(at.is_array(), "tokenizer: ", origin, ": field 'added_tokens' must be a list, got ", at.type_name());
    for (size_t k = 0; k < at.size(); ++k) {
      const std::string prefix = detail::cat("added_tokens[", k, "]");
      const JsonFields f(at[k], origin, prefix);
      Impl::Added a;
      a.content = f.get_string("content");
      HM_CHECK(!a.content.empty(), "tokenizer: ", origin, ": field '", f.field("content"), "' is empty");
      a.id = int32_t(f.get_int("id", 0, kMaxTokenizerVocab - 1));
      a.special = f.has("special") && f.get_bool("special");
      a.normalized = f.has("normalized") ? f.get_bool("normalized") : !a.special;
      for (const char* flag : {"single_word", "lstrip", "rstrip"})
        if (f.has(flag) && f.get_bool(flag))
          refuse(f.field(flag), true, "not supported (added tokens are matched exactly)");
      define(a.content, a.id, f.field("id"));
      if (a.special) m.pieces[size_t(a.id)].clear();
      m.added.push_back(std::move(a));
    }
    std::stable_sort(m.added.begin(), m.added.end(),
                     [](const Impl::Added& x, const Impl::Added& y) { return x.content.size() > y.content.size(); });
  }
  HM_CHECK(max_id >= 0, "tokenizer: ", origin, ": no tokens");
  auto id_of = [&](const char* content) {
    for (const Impl::Added& a : m.added)
      if (a.content == content) return int(a.id);
    return -1;
  };
  eos_ = eos >= 0 ? eos : id_of("<|endoftext|>");
  bos_ = bos >= 0 ? bos : eos_;
  pad_ = pad >= 0 ? pad : eos_;
  for (int id : {bos_, eos_, pad_})
    HM_CHECK(id < 0 || (id <= max_id && m.has_token[size_t(id)]), "tokenizer: ", origin,
             ": bos/eos/pad id ", id, " is not a token of this tokenizer");
}

int HfBpeTokenizer::vocab_size() const { return int(impl_->pieces.size()); }

std::vector<int32_t> HfBpeTokenizer::encode(std::string_view text, bool add_bos) const {
  HM_CHECK(is_valid_utf8(text), "tokenizer: text is not valid UTF-8 (at byte ", utf8_error_offset(text), ")");
  const Impl& m = *impl_;
  std::vector<int32_t> ids;
  if (add_bos) {
    HM_CHECK(bos_ >= 0, "tokenizer: this tokenizer has no bos token to add");
    ids.push_back(bos_);
  }
  m.split_added(text, /*normalized=*/false, ids, [&](std::string_view seg) {
    const std::string norm = m.nfc ? nfc(seg) : std::string(seg);
    m.split_added(norm, /*normalized=*/true, ids, [&](std::string_view s) { m.encode_plain(s, ids); });
  });
  return ids;
}

std::string HfBpeTokenizer::decode_piece(int32_t id) const {
  const int n = vocab_size();
  HM_CHECK(id >= 0 && id < n && impl_->has_token[size_t(id)], "tokenizer: token id ", id,
           id >= 0 && id < n ? " has no token in this tokenizer" : " out of range", " [0, ", n, ")");
  return impl_->pieces[size_t(id)];
}

void HfBpeTokenizer::save(const std::string& dir) const {
  create_dir(dir);
  write_file_atomic((fs::path(dir) / "tokenizer.json").string(), text_);
}

// ---- loading ----

namespace {
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
  if (fs::status(path, ec).type() == fs::file_type::not_found) {
    check_not_task_checkpoint(dir);
    // No quiet switch to bytes: a BPE model decoded as bytes prints control characters.
    throw Error(detail::cat("tokenizer: ", name, " does not exist; every checkpoint names its tokenizer ",
                            "there (hm init and hm train write it). For a byte-level model, write ",
                            "{\"type\": \"byte\"} to it"));
  }
  const nlohmann::json doc = parse_json_file(name);
  if (doc.is_object() && doc.contains("model") && doc["model"].is_object()) {
    // A Hugging Face tokenizer.json; the special ids live in the model's config.json.
    int ids[3] = {-1, -1, -1};
    const fs::path cfg = fs::path(dir) / "config.json";
    if (fs::is_regular_file(cfg, ec)) {
      const nlohmann::json c = parse_hf_json_file(cfg.string());  // may hold Python's Infinity
      const char* keys[3] = {"bos_token_id", "eos_token_id", "pad_token_id"};
      for (int k = 0; k < 3; ++k)
        if (c.is_object() && c.contains(keys[k]) && c[keys[k]].is_number_integer())
          ids[k] = int(json_to_int(c[keys[k]], 0, kMaxTokenizerVocab - 1, cfg.string(), keys[k]));
    }
    return std::make_unique<HfBpeTokenizer>(read_whole_file(path, "tokenizer.json"), name, ids[0], ids[1], ids[2]);
  }
  const JsonFields j(doc, name);
  j.check_known({"type", "model"});
  const std::string type = j.get_string("type");
  if (type == "byte") {
    HM_CHECK(!j.has("model"), "tokenizer: ", name, ": field 'model' does not apply to type \"byte\"");
    return std::make_unique<ByteTokenizer>();
  }
  if (type == "sentencepiece") {
    const std::string model = j.has("model") ? j.get_string("model") : "tokenizer.model";
    const std::string model_path = file_inside_dir(dir, model, name, "model");
    HM_CHECK(fs::exists(model_path, ec), "tokenizer: ", name, ": field 'model': sentencepiece ",
             "model ", model_path, " does not exist");
    return std::make_unique<SentencePieceTokenizer>(model_path);
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
