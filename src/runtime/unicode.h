// Unicode for the Hugging Face tokenizers: general categories, White_Space, NFC, and code points
// of UTF-8 text. Tables come from Python's unicodedata (scripts/gen_unicode_tables.py, Unicode 14):
// characters assigned later read as unassigned (Cn) and are not normalized.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace hm {

// Unicode general categories; Cn (unassigned) is 0. The order is the generator's.
enum class GeneralCategory : uint8_t {
  Cn, Lu, Ll, Lt, Lm, Lo, Mn, Mc, Me, Nd, Nl, No, Pc, Pd, Ps,
  Pe, Pi, Pf, Po, Sm, Sc, Sk, So, Zs, Zl, Zp, Cc, Cf, Cs, Co,
};
constexpr int kGeneralCategories = 30;

GeneralCategory general_category(char32_t c);
bool is_letter(char32_t c);  // L*
bool is_number(char32_t c);  // N*
// Unicode White_Space, which is what \s means in the tokenizers library's regexes (Oniguruma).
bool is_space(char32_t c);

// Decodes valid UTF-8 (the caller checked) into code points; offsets (if given) gets each one's
// byte offset and then the text's size.
void to_code_points(std::string_view s, std::vector<char32_t>& cps, std::vector<size_t>* offsets);
void append_utf8(std::string& out, char32_t c);

// Unicode NFC of valid UTF-8 text (canonical decomposition, reordering, composition).
std::string nfc(std::string_view text);

}  // namespace hm
