// Regular expressions for tokenizer.json (Split pre-tokenizers, Replace normalizers and
// decoders). The tokenizers library compiles these with Oniguruma; this is the part of its
// syntax that published tokenizers use (GPT-4's and Llama 3's splits, o200k/Tekken's, digit and
// punctuation splits), matched the way Oniguruma matches: by backtracking over code points,
// alternatives tried in order, the first match that starts leftmost wins.
//
// Supported: literals and escapes (\t \n \r \f \v \a \e \xHH \x{H..} \uHHHH, escaped
// punctuation), `.` (any but \n), classes [...] and [^...] with ranges, \d \D \w \W \s \S \h \H,
// \p{..} \P{..} \p{^..} with general categories (L Lu Ll Lt Lm Lo LC M Mn Mc Me N Nd Nl No P Pc
// Pd Ps Pe Pi Pf Po S Sm Sc Sk So Z Zs Zl Zp C Cc Cf Cs Co Cn, their long names, Any), groups
// (...) (?:...) (?<name>...) (?i:...) (?-i:...) and (?i) to the group's end, lookahead (?=...)
// (?!...), anchors ^ $ (at line boundaries, as in Ruby's syntax) \A \z \Z, quantifiers ? * + {n}
// {n,} {n,m} {,m} and their lazy forms. Case-insensitive matching folds ASCII letters only; a
// cased non-ASCII literal under (?i) is refused. Anything else (\b, lookbehind, backreferences, scripts like \p{Han}, possessive quantifiers, nested or
// intersected classes) is an hm::Error naming it, never a different match.
#pragma once
#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace hm {

class TextRegex {
 public:
  // pattern: UTF-8. hm::Error naming the pattern and the position of what is not supported.
  explicit TextRegex(std::string_view pattern);
  ~TextRegex();
  TextRegex(TextRegex&&) noexcept;
  TextRegex& operator=(TextRegex&&) noexcept;

  // The non-overlapping matches in text (code points), left to right, as [begin, end) indices;
  // after an empty match the search resumes one character further on. hm::Error if one attempt
  // backtracks more than Oniguruma's default retry limit (10^7 steps) or nests too deeply.
  std::vector<std::pair<size_t, size_t>> find_all(const std::vector<char32_t>& text) const;
  const std::string& pattern() const { return pattern_; }

  struct Program;

 private:
  std::string pattern_;
  std::unique_ptr<Program> prog_;
};

}  // namespace hm
