// Hugging Face tokenizer.json with a BPE model: the pipeline of the tokenizers library (added
// tokens, normalizer, pre-tokenizer, model, post-processor, decoder), for the components that
// published BPE tokenizers use. Each component's behaviour follows the library's; fixtures made
// by the library itself (tests/fixtures/tokenizers) check it.
#include <algorithm>
#include <array>
#include <filesystem>
#include <map>
#include <optional>
#include <queue>
#include <tuple>
#include <unordered_map>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/atomic_file.h"
#include "io/json_read.h"
#include "runtime/text_regex.h"
#include "runtime/tokenizer.h"
#include "runtime/unicode.h"

namespace hm {

namespace fs = std::filesystem;

namespace {

constexpr int64_t kMaxTokenizerVocab = int64_t(1) << 24;  // the model's bound (config.h kMaxVocab)
constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

// GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the other 68 bytes
// for U+0100.. in byte order, so every byte is one visible character.
const std::array<std::string, 256>& byte_symbols() {
  static const std::array<std::string, 256> t = [] {
    std::array<std::string, 256> r;
    char32_t next = 0x100;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      append_utf8(r[size_t(b)], printable ? char32_t(b) : next++);
    }
    return r;
  }();
  return t;
}

const std::unordered_map<char32_t, char>& symbol_bytes() {
  static const std::unordered_map<char32_t, char> m = [] {
    std::unordered_map<char32_t, char> r;
    for (int b = 0; b < 256; ++b) {
      std::vector<char32_t> cp;
      to_code_points(byte_symbols()[size_t(b)], cp, nullptr);
      r[cp[0]] = char(b);
    }
    return r;
  }();
  return m;
}

// "<0xNN>" (the library accepts either case of hex digit) -> NN, else -1.
int byte_token_value(std::string_view t) {
  if (t.size() != 6 || t.compare(0, 3, "<0x") != 0 || t[5] != '>') return -1;
  auto hex = [](char c) {
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
  };
  const int hi = hex(t[3]), lo = hex(t[4]);
  return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
}

std::vector<char32_t> code_points(std::string_view s, std::vector<size_t>* offsets = nullptr) {
  std::vector<char32_t> cp;
  to_code_points(s, cp, offsets);
  return cp;
}

// A Split's, Replace's or Metaspace's pattern: a literal string or a regex.
struct Pattern {
  std::vector<char32_t> literal;
  std::optional<TextRegex> re;

  std::vector<std::pair<size_t, size_t>> find(const std::vector<char32_t>& t) const {
    if (re) return re->find_all(t);
    std::vector<std::pair<size_t, size_t>> out;
    const size_t n = literal.size();
    for (size_t i = 0; n && i + n <= t.size();) {
      if (std::equal(literal.begin(), literal.end(), t.begin() + std::ptrdiff_t(i))) {
        out.emplace_back(i, i + n);
        i += n;
      } else {
        ++i;
      }
    }
    return out;
  }

  std::string replace_all(std::string_view s, std::string_view content) const {
    std::vector<size_t> off;
    const auto cp = code_points(s, &off);
    std::string out;
    size_t prev = 0;
    for (const auto& [b, e] : find(cp)) {
      out.append(s.substr(off[prev], off[b] - off[prev]));
      out.append(content);
      prev = e;
    }
    out.append(s.substr(off[prev]));
    return out;
  }
};

enum class Behavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

// The pieces [begin, end) that a split of n characters keeps, given its matches: the
// library's SplitDelimiterBehavior, with empty pieces dropped.
std::vector<std::pair<size_t, size_t>> split_spans(size_t n, const std::vector<std::pair<size_t, size_t>>& matches,
                                                   Behavior behavior, bool invert) {
  struct Span { size_t b, e; bool match; };
  std::vector<Span> v;
  size_t prev = 0;
  for (const auto& [b, e] : matches) {
    if (prev != b) v.push_back({prev, b, false});
    v.push_back({b, e, true});
    prev = e;
  }
  if (prev != n) v.push_back({prev, n, false});
  if (invert)
    for (Span& s : v) s.match = !s.match;
  std::vector<Span> r;
  bool prev_match = false;
  switch (behavior) {
    case Behavior::Removed:
      for (const Span& s : v)
        if (!s.match) r.push_back(s);
      break;
    case Behavior::Isolated:
      r = v;
      break;
    case Behavior::MergedWithPrevious:
      for (const Span& s : v) {
        if (s.match && !prev_match && !r.empty()) r.back().e = s.e;
        else r.push_back(s);
        prev_match = s.match;
      }
      break;
    case Behavior::MergedWithNext:
      for (size_t k = v.size(); k-- > 0;) {
        const Span& s = v[k];
        if (s.match && !prev_match && !r.empty()) r.back().b = s.b;
        else r.push_back(s);
        prev_match = s.match;
      }
      std::reverse(r.begin(), r.end());
      break;
    case Behavior::Contiguous:
      for (const Span& s : v) {
        if (s.match == prev_match && !r.empty()) r.back().e = s.e;
        else r.push_back(s);
        prev_match = s.match;
      }
      break;
  }
  std::vector<std::pair<size_t, size_t>> out;
  for (const Span& s : r)
    if (s.e > s.b) out.emplace_back(s.b, s.e);
  return out;
}

// A piece of text between pre-tokenizer steps; `first`: it starts at offset 0 of the original
// text (what Metaspace's prepend_scheme "first" asks).
struct Piece {
  std::string text;
  bool first;
  bool raw = false;  // bytes that a final ByteLevel step left unmapped: bpe maps them itself
};

}  // namespace

std::vector<std::string_view> gpt2_split(std::string_view text) {
  std::vector<size_t> off;
  const std::vector<char32_t> cp = code_points(text, &off);
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
  struct Norm {
    enum Kind { Nfc, Prepend, Replace } kind;
    std::string text;  // Prepend's prefix, Replace's content
    Pattern pattern;
  };
  struct Pre {
    enum Kind { ByteLevel, Split, Metaspace, Digits, Punctuation } kind;
    bool add_prefix_space = false, use_regex = true;       // ByteLevel
    Pattern pattern;                                       // Split; Metaspace's replacement
    Behavior behavior = Behavior::Isolated;                // Split, Punctuation
    bool invert = false;                                   // Split
    std::string replacement;                               // Metaspace
    enum Scheme { Always, First, Never } scheme = Always;  // Metaspace
    bool split = true;                                     // Metaspace
    bool individual_digits = false;                        // Digits
  };
  struct Dec {
    enum Kind { ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace } kind;
    Pattern pattern;          // Replace
    std::string text;         // Replace's content; Metaspace's replacement
    char32_t strip_char = 0;  // Strip
    size_t start = 0, stop = 0;
    bool prepend = true;      // Metaspace: prepend_scheme is not "never"
  };

  std::unordered_map<std::string, int32_t> vocab;
  std::unordered_map<char32_t, int32_t> char_id;  // tokens of one character
  std::vector<std::string> token;                 // id -> its string in the file
  std::vector<std::string> pieces;                // id -> decode_piece ("" for specials)
  std::vector<bool> has_token, special;
  std::vector<Added> added;                       // longest first: the first match at a position wins
  std::array<std::vector<int>, 256> added_by_byte;  // indices into added, by first byte (in added's order)
  std::map<std::pair<int32_t, int32_t>, std::pair<int, int32_t>> merges;  // pair -> (rank, merged id)
  std::vector<Norm> norm;
  std::vector<Pre> pre;
  std::vector<Dec> dec;
  int32_t unk = -1;
  int32_t byte_token[256];  // ids of "<0xNN>", -1 where missing (byte_fallback)
  int32_t byte_id[256];     // ids of the byte-level symbols (a ByteLevel pre-tokenizer's vocabulary)
  bool byte_fallback = false, fuse_unk = false, ignore_merges = false;
  bool has_template = false;
  std::vector<int32_t> prefix, suffix;  // the post-processor's special tokens around the text

  // ---- encoding ----

  std::string normalize(std::string s) const {
    for (const Norm& n : norm) {
      if (s.empty()) break;
      switch (n.kind) {
        case Norm::Nfc: s = nfc(s); break;
        case Norm::Prepend: s = n.text + s; break;
        case Norm::Replace: s = n.pattern.replace_all(s, n.text); break;
      }
    }
    return s;
  }

  static void split_piece(const Piece& p, const std::vector<std::pair<size_t, size_t>>& matches, size_t n,
                          const std::vector<size_t>& off, Behavior behavior, bool invert, std::vector<Piece>& out) {
    for (const auto& [b, e] : split_spans(n, matches, behavior, invert))
      out.push_back({p.text.substr(off[b], off[e] - off[b]), p.first && b == 0});
  }

  std::vector<Piece> pre_tokenize(Piece whole) const {
    std::vector<Piece> cur{std::move(whole)}, next;
    for (const Pre& s : pre) {
      const bool last = &s == &pre.back();
      next.clear();
      for (Piece& p : cur) {
        std::vector<size_t> off;
        switch (s.kind) {
          case Pre::ByteLevel: {
            if (s.add_prefix_space && p.text[0] != ' ') p.text = " " + p.text;
            std::vector<std::string_view> words;
            if (s.use_regex) words = gpt2_split(p.text);
            else words = {p.text};
            size_t at = 0;
            for (std::string_view w : words) {
              if (last) {  // the model maps the bytes to their symbols' ids directly (bpe)
                next.push_back({std::string(w), p.first && at == 0, true});
              } else {  // later steps see the symbols, as in the library
                std::string mapped;
                for (char ch : w) mapped += byte_symbols()[static_cast<unsigned char>(ch)];
                next.push_back({std::move(mapped), p.first && at == 0});
              }
              at += w.size();
            }
            break;
          }
          case Pre::Split: {
            const auto cp = code_points(p.text, &off);
            split_piece(p, s.pattern.find(cp), cp.size(), off, s.behavior, s.invert, next);
            break;
          }
          case Pre::Metaspace: {
            std::string t;
            for (char ch : p.text) {
              if (ch == ' ') t += s.replacement;
              else t += ch;
            }
            if ((s.scheme == Pre::Always || (s.scheme == Pre::First && p.first)) && t.compare(0, s.replacement.size(), s.replacement) != 0)
              t = s.replacement + t;
            Piece q{std::move(t), p.first};
            if (!s.split) {
              next.push_back(std::move(q));
              break;
            }
            const auto cp = code_points(q.text, &off);
            split_piece(q, s.pattern.find(cp), cp.size(), off, Behavior::MergedWithNext, false, next);
            break;
          }
          case Pre::Digits:
          case Pre::Punctuation: {
            const auto cp = code_points(p.text, &off);
            std::vector<std::pair<size_t, size_t>> m;
            for (size_t k = 0; k < cp.size(); ++k) {
              const char32_t c = cp[k];
              bool hit;
              if (s.kind == Pre::Digits) {
                hit = is_number(c);  // Rust's char::is_numeric: N*
              } else {
                const auto g = general_category(c);
                hit = (c < 0x80 && c > 0x20 && c != 0x7F && !is_letter(c) && !is_number(c)) ||
                      (g >= GeneralCategory::Pc && g <= GeneralCategory::Po);
              }
              if (hit) m.emplace_back(k, k + 1);
            }
            const Behavior b = s.kind == Pre::Punctuation ? s.behavior
                               : s.individual_digits      ? Behavior::Isolated
                                                          : Behavior::Contiguous;
            split_piece(p, m, cp.size(), off, b, false, next);
            break;
          }
        }
      }
      std::swap(cur, next);
    }
    return cur;
  }

  // BPE of one pre-token: its characters (byte pieces for those the vocabulary lacks, with
  // byte_fallback; else the unknown token, fused), then merges lowest rank first (leftmost among
  // equals) as tokenizers' Word::merge_all does, with a heap so a long word costs O(n log n).
  // raw: word is bytes, each standing for its byte-level symbol.
  void bpe(std::string_view word, bool raw, std::vector<int32_t>& ids) const {
    if (ignore_merges) {
      std::string key;
      if (raw)
        for (char ch : word) key += byte_symbols()[static_cast<unsigned char>(ch)];
      if (auto it = vocab.find(raw ? key : std::string(word)); it != vocab.end()) {
        ids.push_back(it->second);
        return;
      }
    }
    std::vector<int32_t> sym;
    if (raw) {
      sym.reserve(word.size());
      for (char ch : word) sym.push_back(byte_id[static_cast<unsigned char>(ch)]);
      return merge(sym, ids);
    }
    bool last_unk = false;
    for (const char32_t c : code_points(word)) {
      if (const auto it = char_id.find(c); it != char_id.end()) {
        sym.push_back(it->second);
        last_unk = false;
        continue;
      }
      if (byte_fallback) {
        std::string u;
        append_utf8(u, c);
        bool all = true;
        for (char ch : u) all = all && byte_token[static_cast<unsigned char>(ch)] >= 0;
        if (all) {
          for (char ch : u) sym.push_back(byte_token[static_cast<unsigned char>(ch)]);
          last_unk = false;
          continue;
        }
      }
      if (unk >= 0) {  // without an unknown token the library drops the character; so do we
        if (!(fuse_unk && last_unk)) sym.push_back(unk);
        last_unk = true;
      }
    }
    merge(sym, ids);
  }
  // Merges sym lowest rank first and appends the result to ids.
  void merge(std::vector<int32_t>& sym, std::vector<int32_t>& ids) const {
    const int n = int(sym.size());
    std::vector<int> next(static_cast<size_t>(n)), prev(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) next[size_t(i)] = i + 1 < n ? i + 1 : -1, prev[size_t(i)] = i - 1;
    using Entry = std::tuple<int, int, int32_t, int32_t>;  // rank, position, left id, right id
    std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
    auto push = [&](int i) {
      if (i < 0 || next[size_t(i)] < 0) return;
      const auto it = merges.find({sym[size_t(i)], sym[size_t(next[size_t(i)])]});
      if (it != merges.end()) heap.emplace(it->second.first, i, sym[size_t(i)], sym[size_t(next[size_t(i)])]);
    };
    for (int i = 0; i + 1 < n; ++i) push(i);
    std::vector<bool> dead(static_cast<size_t>(n), false);
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

  // Splits text on the added tokens of one kind (normalized or not), leftmost-longest; `rest`
  // gets the text between them and its offset in text.
  template <class F>
  void split_added(std::string_view text, bool normalized, std::vector<int32_t>& ids, F&& rest) const {
    size_t start = 0;
    for (size_t i = 0; i < text.size();) {
      const Added* hit = nullptr;
      for (const int k : added_by_byte[static_cast<unsigned char>(text[i])]) {
        const Added& a = added[size_t(k)];
        if (a.normalized == normalized && text.compare(i, a.content.size(), a.content) == 0) {
          hit = &a;
          break;
        }
      }
      if (!hit) {
        ++i;
        continue;
      }
      rest(text.substr(start, i - start), start);
      ids.push_back(hit->id);
      i += hit->content.size();
      start = i;
    }
    rest(text.substr(start), start);
  }

  // ---- decoding ----

  // The decoder chain over a list of tokens, as the library runs it. stream: decode_piece's
  // view of one token in the middle of a text: no stripping at the start, and byte pieces
  // stay raw bytes (Utf8StreamDecoder joins or replaces them).
  std::string run_decoders(std::vector<std::string> toks, bool stream) const {
    for (const Dec& d : dec) {
      switch (d.kind) {
        case Dec::ByteLevel: {
          std::string all;
          for (const std::string& t : toks) {
            std::string bytes;
            bool ok = true;
            for (char32_t c : code_points(t)) {
              const auto it = symbol_bytes().find(c);
              if (it == symbol_bytes().end()) {
                ok = false;
                break;
              }
              bytes += it->second;
            }
            all += ok ? bytes : t;
          }
          toks = {std::move(all)};
          break;
        }
        case Dec::Replace:
          for (std::string& t : toks) t = d.pattern.replace_all(t, d.text);
          break;
        case Dec::ByteFallback: {
          std::vector<std::string> out;
          std::string bytes;
          size_t count = 0;
          auto flush = [&] {
            if (!count) return;
            if (stream || is_valid_utf8(bytes)) {
              out.push_back(bytes);
            } else {
              for (size_t k = 0; k < count; ++k) out.emplace_back(kReplacementChar);
            }
            bytes.clear(), count = 0;
          };
          for (std::string& t : toks) {
            const int b = byte_token_value(t);
            if (b >= 0) {
              bytes += char(b), ++count;
              continue;
            }
            flush();
            out.push_back(std::move(t));
          }
          flush();
          toks = std::move(out);
          break;
        }
        case Dec::Fuse: {
          std::string all;
          for (const std::string& t : toks) all += t;
          toks = {std::move(all)};
          break;
        }
        case Dec::Strip:
          if (stream) break;
          for (std::string& t : toks) {
            std::vector<size_t> off;
            const auto cp = code_points(t, &off);
            size_t a = 0, b = cp.size();
            while (a < d.start && a < b && cp[a] == d.strip_char) ++a;
            for (size_t k = 0; k < d.stop && b > a && cp[b - 1] == d.strip_char; ++k) --b;
            t = t.substr(off[a], off[b] - off[a]);
          }
          break;
        case Dec::Metaspace:
          for (size_t i = 0; i < toks.size(); ++i) {
            std::string t;
            const std::string& s = toks[i];
            for (size_t k = 0; k < s.size();) {
              if (s.compare(k, d.text.size(), d.text) == 0) {
                // The library drops every replacement in the first token, not only a leading one.
                if (!(i == 0 && !stream && d.prepend)) t += ' ';
                k += d.text.size();
              } else {
                t += s[k++];
              }
            }
            toks[i] = std::move(t);
          }
          break;
      }
    }
    std::string out;
    for (const std::string& t : toks) out += t;
    return out;
  }
};

HfBpeTokenizer::~HfBpeTokenizer() = default;

namespace {

// tokenizer.json parsing helpers: every refusal names the field and what we support.
struct Reader {
  const std::string& origin;

  [[noreturn]] void refuse(const std::string& field, const nlohmann::json& v, const std::string& why) const {
    std::string shown = v.dump();
    if (shown.size() > 200) shown = shown.substr(0, 200) + "...";
    throw Error(detail::cat("tokenizer: ", origin, ": field '", field, "' is ", shown, ": ", why));
  }
  static std::string type_of(const JsonFields& f) { return f.has("type") ? f.get_string("type") : std::string(); }

  Pattern pattern(const JsonFields& f, const char* key) const {
    const JsonFields p = f.object(key);
    Pattern out;
    if (p.has("String")) {
      const std::string s = p.get_string("String");
      HM_CHECK(!s.empty() && is_valid_utf8(s), "tokenizer: ", origin, ": field '", p.field("String"),
               "' must be non-empty UTF-8");
      out.literal = code_points(s);
    } else if (p.has("Regex")) {
      out.re.emplace(p.get_string("Regex"));
    } else {
      refuse(f.field(key), p.value(), "expected {\"String\": ...} or {\"Regex\": ...}");
    }
    return out;
  }

  Behavior behavior(const JsonFields& f, const char* key) const {
    const std::string b = f.get_string(key);
    if (b == "Removed") return Behavior::Removed;
    if (b == "Isolated") return Behavior::Isolated;
    if (b == "MergedWithPrevious") return Behavior::MergedWithPrevious;
    if (b == "MergedWithNext") return Behavior::MergedWithNext;
    if (b == "Contiguous") return Behavior::Contiguous;
    refuse(f.field(key), f.at(key), "unknown split behavior");
  }

  // Sequence components flatten into a list of steps.
  template <class F>
  void each(const nlohmann::json& v, const std::string& field, const char* list_key, F&& one) const {
    const JsonFields f(v, origin, field);
    if (type_of(f) == "Sequence") {
      const nlohmann::json& items = f.at(list_key);
      HM_CHECK(items.is_array(), "tokenizer: ", origin, ": field '", f.field(list_key), "' must be a list");
      for (size_t k = 0; k < items.size(); ++k)
        each(items[k], detail::cat(f.field(list_key), "[", k, "]"), list_key, one);
      return;
    }
    one(f);
  }

  void normalizer(const nlohmann::json& v, std::vector<HfBpeTokenizer::Impl::Norm>& out) const {
    using Norm = HfBpeTokenizer::Impl::Norm;
    each(v, "normalizer", "normalizers", [&](const JsonFields& f) {
      const std::string t = type_of(f);
      Norm n;
      if (t == "NFC") {
        n.kind = Norm::Nfc;
      } else if (t == "Prepend") {
        n.kind = Norm::Prepend, n.text = f.get_string("prepend");
      } else if (t == "Replace") {
        n.kind = Norm::Replace, n.pattern = pattern(f, "pattern"), n.text = f.get_string("content");
      } else {
        refuse(f.field("type"), f.has("type") ? f.at("type") : nlohmann::json(), "only NFC, Prepend, Replace and Sequence of them are supported");
      }
      out.push_back(std::move(n));
    });
  }

  void pre_tokenizer(const nlohmann::json& v, std::vector<HfBpeTokenizer::Impl::Pre>& out) const {
    using Pre = HfBpeTokenizer::Impl::Pre;
    each(v, "pre_tokenizer", "pretokenizers", [&](const JsonFields& f) {
      const std::string t = type_of(f);
      Pre p;
      if (t == "ByteLevel") {
        p.kind = Pre::ByteLevel;
        if (f.has("add_prefix_space")) p.add_prefix_space = f.get_bool("add_prefix_space");
        if (f.has("use_regex")) p.use_regex = f.get_bool("use_regex");
      } else if (t == "Split") {
        p.kind = Pre::Split;
        p.pattern = pattern(f, "pattern");
        p.behavior = behavior(f, "behavior");
        if (f.has("invert")) p.invert = f.get_bool("invert");
      } else if (t == "Metaspace") {
        p.kind = Pre::Metaspace;
        p.replacement = f.has("replacement") ? f.get_string("replacement") : "\xE2\x96\x81";
        const auto cp = is_valid_utf8(p.replacement) ? code_points(p.replacement) : std::vector<char32_t>{};
        HM_CHECK(cp.size() == 1, "tokenizer: ", origin, ": field '", f.field("replacement"), "' must be one character");
        p.pattern.literal = cp;
        if (f.has("split")) p.split = f.get_bool("split");
        if (f.has("prepend_scheme")) {
          const std::string s = f.get_string("prepend_scheme");
          if (s == "always") p.scheme = Pre::Always;
          else if (s == "first") p.scheme = Pre::First;
          else if (s == "never") p.scheme = Pre::Never;
          else refuse(f.field("prepend_scheme"), f.at("prepend_scheme"), "expected always, first or never");
        } else if (f.has("add_prefix_space")) {  // the older field
          p.scheme = f.get_bool("add_prefix_space") ? Pre::Always : Pre::Never;
        }
      } else if (t == "Digits") {
        p.kind = Pre::Digits;
        if (f.has("individual_digits")) p.individual_digits = f.get_bool("individual_digits");
      } else if (t == "Punctuation") {
        p.kind = Pre::Punctuation;
        if (f.has("behavior")) p.behavior = behavior(f, "behavior");
      } else {
        refuse(f.field("type"), f.has("type") ? f.at("type") : nlohmann::json(),
               "only ByteLevel, Split, Metaspace, Digits, Punctuation and Sequence of them are supported");
      }
      out.push_back(std::move(p));
    });
  }

  void decoder(const nlohmann::json& v, std::vector<HfBpeTokenizer::Impl::Dec>& out) const {
    using Dec = HfBpeTokenizer::Impl::Dec;
    each(v, "decoder", "decoders", [&](const JsonFields& f) {
      const std::string t = type_of(f);
      Dec d;
      if (t == "ByteLevel") {
        d.kind = Dec::ByteLevel;
      } else if (t == "Replace") {
        d.kind = Dec::Replace, d.pattern = pattern(f, "pattern"), d.text = f.get_string("content");
      } else if (t == "ByteFallback") {
        d.kind = Dec::ByteFallback;
      } else if (t == "Fuse") {
        d.kind = Dec::Fuse;
      } else if (t == "Strip") {
        d.kind = Dec::Strip;
        const std::string c = f.get_string("content");
        const auto cp = is_valid_utf8(c) ? code_points(c) : std::vector<char32_t>{};
        HM_CHECK(cp.size() == 1, "tokenizer: ", origin, ": field '", f.field("content"), "' must be one character");
        d.strip_char = cp[0];
        d.start = size_t(f.get_int("start", 0, 1 << 20)), d.stop = size_t(f.get_int("stop", 0, 1 << 20));
      } else if (t == "Metaspace") {
        d.kind = Dec::Metaspace;
        d.text = f.has("replacement") ? f.get_string("replacement") : "\xE2\x96\x81";
        HM_CHECK(!d.text.empty() && is_valid_utf8(d.text), "tokenizer: ", origin, ": field '", f.field("replacement"),
                 "' must be one character");
        if (f.has("prepend_scheme")) d.prepend = f.get_string("prepend_scheme") != "never";
        else if (f.has("add_prefix_space")) d.prepend = f.get_bool("add_prefix_space");
      } else {
        refuse(f.field("type"), f.has("type") ? f.at("type") : nlohmann::json(),
               "only ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace and Sequence of them are supported");
      }
      out.push_back(std::move(d));
    });
  }
};

}  // namespace

HfBpeTokenizer::HfBpeTokenizer(std::string text, const std::string& origin, int bos, int eos, int pad)
    : text_(std::move(text)), impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  const Reader rd{origin};
  const nlohmann::json doc = parse_json(text_, origin);
  const JsonFields j(doc, origin);
  if (j.has("truncation") && !j.at("truncation").is_null())
    rd.refuse("truncation", j.at("truncation"), "truncation is not supported (encode returns every token)");
  if (j.has("normalizer") && !j.at("normalizer").is_null()) rd.normalizer(j.at("normalizer"), m.norm);
  if (j.has("pre_tokenizer") && !j.at("pre_tokenizer").is_null()) rd.pre_tokenizer(j.at("pre_tokenizer"), m.pre);
  HM_CHECK(j.has("decoder") && !j.at("decoder").is_null(), "tokenizer: ", origin,
           ": field 'decoder' is missing or null: the tokens could not be turned back into text");
  rd.decoder(j.at("decoder"), m.dec);
  const bool byte_level = std::any_of(m.pre.begin(), m.pre.end(), [](const Impl::Pre& p) { return p.kind == Impl::Pre::ByteLevel; });

  // Model: BPE.
  const JsonFields mf = j.object("model");
  if (Reader::type_of(mf) != "BPE")
    rd.refuse("model.type", mf.has("type") ? mf.at("type") : nlohmann::json(), "only BPE is supported");
  for (const char* k : {"dropout", "continuing_subword_prefix", "end_of_word_suffix"})
    if (mf.has(k) && !mf.at(k).is_null()) rd.refuse(mf.field(k), mf.at(k), "not supported");
  if (mf.has("byte_fallback")) m.byte_fallback = mf.get_bool("byte_fallback");
  if (mf.has("fuse_unk")) m.fuse_unk = mf.get_bool("fuse_unk");
  if (mf.has("ignore_merges")) m.ignore_merges = mf.get_bool("ignore_merges");
  const nlohmann::json& vocab = mf.at("vocab");
  HM_CHECK(vocab.is_object(), "tokenizer: ", origin, ": field 'model.vocab' must be an object, got ", vocab.type_name());
  int32_t max_id = -1;
  auto define = [&](const std::string& tok, int32_t id) {
    HM_CHECK(is_valid_utf8(tok), "tokenizer: ", origin, ": token of id ", id, " is not valid UTF-8");
    max_id = std::max(max_id, id);
    if (size_t(id) >= m.token.size()) {
      m.token.resize(size_t(id) + 1);
      m.has_token.resize(size_t(id) + 1, false);
      m.special.resize(size_t(id) + 1, false);
    }
    m.has_token[size_t(id)] = true;
    m.token[size_t(id)] = tok;
  };
  for (const auto& [tok, id] : vocab.items()) {
    const auto v = int32_t(json_to_int(id, 0, kMaxTokenizerVocab - 1, origin, "model.vocab." + tok));
    define(tok, v);
    m.vocab.emplace(tok, v);
    if (const auto cp = code_points(tok); cp.size() == 1) m.char_id.emplace(cp[0], v);
  }
  std::fill(std::begin(m.byte_id), std::end(m.byte_id), -1);
  if (byte_level)
    for (int b = 0; b < 256; ++b) {
      const auto it = m.vocab.find(byte_symbols()[size_t(b)]);
      HM_CHECK(it != m.vocab.end(), "tokenizer: ", origin, ": field 'model.vocab' lacks the byte-level symbol of byte ",
               b, " (\"", byte_symbols()[size_t(b)], "\"): not a byte-level BPE vocabulary");
      m.byte_id[b] = it->second;
    }
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    const auto it = m.vocab.find(name);
    m.byte_token[b] = it == m.vocab.end() ? -1 : it->second;
  }
  if (mf.has("unk_token") && !mf.at("unk_token").is_null()) {
    const std::string u = mf.get_string("unk_token");
    const auto it = m.vocab.find(u);
    HM_CHECK(it != m.vocab.end(), "tokenizer: ", origin, ": field 'model.unk_token' is \"", u,
             "\", which is not in model.vocab");
    m.unk = it->second;
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
      const JsonFields f(at[k], origin, detail::cat("added_tokens[", k, "]"));
      Impl::Added a;
      a.content = f.get_string("content");
      HM_CHECK(!a.content.empty(), "tokenizer: ", origin, ": field '", f.field("content"), "' is empty");
      a.id = int32_t(f.get_int("id", 0, kMaxTokenizerVocab - 1));
      a.special = f.has("special") && f.get_bool("special");
      a.normalized = f.has("normalized") ? f.get_bool("normalized") : !a.special;
      for (const char* flag : {"single_word", "lstrip", "rstrip"})
        if (f.has(flag) && f.get_bool(flag))
          rd.refuse(f.field(flag), true, "not supported (added tokens are matched exactly)");
      define(a.content, a.id);
      m.special[size_t(a.id)] = a.special;
      m.added.push_back(std::move(a));
    }
    std::stable_sort(m.added.begin(), m.added.end(),
                     [](const Impl::Added& x, const Impl::Added& y) { return x.content.size() > y.content.size(); });
    for (size_t k = 0; k < m.added.size(); ++k)
      m.added_by_byte[static_cast<unsigned char>(m.added[k].content[0])].push_back(int(k));
  }
  HM_CHECK(max_id >= 0, "tokenizer: ", origin, ": no tokens");

  // Post-processor: none, ByteLevel (offsets only), a template that adds special tokens.
  auto template_processing = [&](const JsonFields& f) {
    HM_CHECK(!m.has_template, "tokenizer: ", origin, ": field 'post_processor' has two templates");
    m.has_template = true;
    const nlohmann::json& single = f.at("single");
    HM_CHECK(single.is_array(), "tokenizer: ", origin, ": field '", f.field("single"), "' must be a list");
    const JsonFields specials = f.object("special_tokens");
    bool seen_text = false;
    for (size_t k = 0; k < single.size(); ++k) {
      const JsonFields item(single[k], origin, detail::cat(f.field("single"), "[", k, "]"));
      if (item.has("Sequence")) {
        const JsonFields s = item.object("Sequence");
        HM_CHECK(!seen_text && s.get_string("id") == "A", "tokenizer: ", origin, ": field '", item.field("Sequence"),
                 "': a template for one text must hold sequence A once");
        seen_text = true;
      } else {
        const JsonFields s = item.object("SpecialToken");
        const std::string name = s.get_string("id");
        HM_CHECK(specials.has(name.c_str()), "tokenizer: ", origin, ": field '", s.field("id"), "' names \"", name,
                 "\", which is not in ", f.field("special_tokens"));
        const JsonFields st = specials.object(name.c_str());
        const nlohmann::json& ids = st.at("ids");
        HM_CHECK(ids.is_array(), "tokenizer: ", origin, ": field '", st.field("ids"), "' must be a list");
        for (const nlohmann::json& id : ids) {
          const auto v = int32_t(json_to_int(id, 0, max_id, origin, st.field("ids")));
          HM_CHECK(m.has_token[size_t(v)], "tokenizer: ", origin, ": field '", st.field("ids"), "' holds id ", v,
                   ", which is no token");
          (seen_text ? m.suffix : m.prefix).push_back(v);
        }
      }
    }
    HM_CHECK(seen_text, "tokenizer: ", origin, ": field '", f.field("single"), "' lacks the text (sequence A)");
  };
  if (j.has("post_processor") && !j.at("post_processor").is_null())
    rd.each(j.at("post_processor"), "post_processor", "processors", [&](const JsonFields& f) {
      const std::string t = Reader::type_of(f);
      if (t == "TemplateProcessing") template_processing(f);
      else if (t != "ByteLevel")  // ByteLevel's post-processor only trims offsets
        rd.refuse(f.field("type"), f.has("type") ? f.at("type") : nlohmann::json(), "only ByteLevel, TemplateProcessing and Sequence of them are supported");
    });

  // What each token reads as inside a text.
  m.pieces.assign(m.token.size(), {});
  for (size_t id = 0; id < m.token.size(); ++id)
    if (m.has_token[id] && !m.special[id]) m.pieces[id] = m.run_decoders({m.token[id]}, /*stream=*/true);

  auto id_of = [&](const char* content) {
    for (const Impl::Added& a : m.added)
      if (a.content == content) return int(a.id);
    return -1;
  };
  eos_ = eos >= 0 ? eos : id_of("<|endoftext|>");
  bos_ = bos >= 0 ? bos : !m.prefix.empty() ? m.prefix[0] : eos_;
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
    if (m.has_template) {
      ids = m.prefix;
    } else {
      HM_CHECK(bos_ >= 0, "tokenizer: this tokenizer has no bos token to add");
      ids.push_back(bos_);
    }
  }
  m.split_added(text, /*normalized=*/false, ids, [&](std::string_view seg, size_t at) {
    const std::string norm = m.normalize(std::string(seg));
    m.split_added(norm, /*normalized=*/true, ids, [&](std::string_view s, size_t at2) {
      if (s.empty()) return;
      for (const Piece& p : m.pre_tokenize({std::string(s), at == 0 && at2 == 0})) m.bpe(p.text, p.raw, ids);
    });
  });
  if (add_bos && m.has_template) ids.insert(ids.end(), m.suffix.begin(), m.suffix.end());
  return ids;
}

// An id inside the range that names no token (a gap in the vocabulary) reads as "", as the
// library skips ids it has no token for.
std::string HfBpeTokenizer::decode_piece(int32_t id) const {
  const int n = vocab_size();
  HM_CHECK(id >= 0 && id < n, "tokenizer: token id ", id, " out of range [0, ", n, ")");
  return impl_->pieces[size_t(id)];
}

std::string HfBpeTokenizer::decode(const std::vector<int32_t>& ids) const {
  std::vector<std::string> toks;
  for (int32_t id : ids) {
    (void)decode_piece(id);  // range check
    if (impl_->has_token[size_t(id)] && !impl_->special[size_t(id)]) toks.push_back(impl_->token[size_t(id)]);
  }
  return impl_->run_decoders(std::move(toks), /*stream=*/false);
}

std::vector<std::string> hf_pre_tokenize(const std::string& pre_tokenizer_json, std::string_view text) {
  HM_CHECK(is_valid_utf8(text), "tokenizer: text is not valid UTF-8 (at byte ", utf8_error_offset(text), ")");
  const std::string origin = "pre_tokenizer";
  HfBpeTokenizer::Impl m;
  Reader{origin}.pre_tokenizer(parse_json(pre_tokenizer_json, origin), m.pre);
  std::vector<std::string> out;
  if (text.empty()) return out;
  for (Piece& p : m.pre_tokenize({std::string(text), true})) {
    if (!p.raw) {
      out.push_back(std::move(p.text));
      continue;
    }
    std::string mapped;  // the library shows the byte-level symbols
    for (char ch : p.text) mapped += byte_symbols()[static_cast<unsigned char>(ch)];
    out.push_back(std::move(mapped));
  }
  return out;
}

void HfBpeTokenizer::save(const std::string& dir) const {
  std::error_code ec;
  fs::create_directories(dir, ec);
  HM_CHECK(!ec, "tokenizer: cannot create directory ", dir, ": ", ec.message());
  write_file_atomic((fs::path(dir) / "tokenizer.json").string(), text_);
}

}  // namespace hm
