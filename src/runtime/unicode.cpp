#include "runtime/unicode.h"

#include <algorithm>
#include <iterator>

namespace hm {

namespace {

struct ClassRange { char32_t lo, hi; int cls; };
struct Decomposition { char32_t cp; uint16_t offset, len; };
struct Composition { char32_t first, second, composed; };
#include "runtime/unicode_tables.inc"

}  // namespace

GeneralCategory general_category(char32_t c) {
  const auto it = std::upper_bound(std::begin(kCategoryRanges), std::end(kCategoryRanges), c,
                                   [](char32_t v, const ClassRange& x) { return v < x.lo; });
  return it != std::begin(kCategoryRanges) && c <= std::prev(it)->hi ? GeneralCategory(std::prev(it)->cls)
                                                                     : GeneralCategory::Cn;
}
bool is_letter(char32_t c) {
  if (c < 0x80) return (c | 0x20) >= 'a' && (c | 0x20) <= 'z';
  const auto g = general_category(c);
  return g >= GeneralCategory::Lu && g <= GeneralCategory::Lo;
}
bool is_number(char32_t c) {
  if (c < 0x80) return c >= '0' && c <= '9';
  const auto g = general_category(c);
  return g >= GeneralCategory::Nd && g <= GeneralCategory::No;
}
bool is_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

namespace {

int combining_class(char32_t c) {
  if (c < 0x300) return 0;
  const auto it = std::upper_bound(std::begin(kCombiningClass), std::end(kCombiningClass), c,
                                   [](char32_t v, const ClassRange& x) { return v < x.lo; });
  return it != std::begin(kCombiningClass) && c <= std::prev(it)->hi ? std::prev(it)->cls : 0;
}

}  // namespace

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

namespace {

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


}  // namespace hm
