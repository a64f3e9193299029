// tokenizer.json families beyond GPT-2's byte-level BPE, against Hugging Face's tokenizers
// library: fixtures written by tests/fixtures/tokenizers/make_tokenizers.mjs (tokenizers 0.23.2,
// the Rust core through its Node binding). And the regex engine those tokenizers need.
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/error.h"
#include "runtime/text_regex.h"
#include "runtime/tokenizer.h"
#include "runtime/unicode.h"
#include "hf_test_util.h"
#include "test_util.h"

namespace hm {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using test::read_json;
using test::write_text;

const fs::path kDir = fs::path(HM_SOURCE_DIR) / "tests" / "fixtures" / "tokenizers";
const char* const kFamilies[] = {"llama3_bpe", "o200k_bpe", "falcon_bpe", "spm_legacy", "metaspace_first",
                                 "metaspace_split"};

std::vector<char32_t> cps(std::string_view s) {
  std::vector<char32_t> c;
  to_code_points(s, c, nullptr);
  return c;
}

// The matched substrings of text.
std::vector<std::string> matches(const std::string& pattern, const std::string& text) {
  std::vector<size_t> off;
  std::vector<char32_t> c;
  to_code_points(text, c, &off);
  std::vector<std::string> out;
  for (const auto& [b, e] : TextRegex(pattern).find_all(c)) out.push_back(text.substr(off[b], off[e] - off[b]));
  return out;
}

}  // namespace

// Ids with and without the template's special tokens, and decoded text, for 20 hand-picked
// strings, 40 seeded random ones and special-token strings, on six families.
TEST(HfTokenizerFamilies, IdsAndTextMatchTokenizers) {
  for (const char* name : kFamilies) {
    SCOPED_TRACE(name);
    auto tok = load_tokenizer((kDir / name).string());
    const json exp = read_json(kDir / name / "expected.json");
    // Without a template the library adds nothing; we add bos (hm generate's prompts start there).
    const bool templ = !read_json(kDir / name / "tokenizer.json")["post_processor"].is_null();
    int n = 0, nonempty = 0;
    for (const json& c : exp["cases"]) {
      const std::string text = c["text"];
      SCOPED_TRACE(text);
      const auto ids = c["ids"].get<std::vector<int32_t>>();
      EXPECT_EQ(tok->encode(text, false), ids);
      std::vector<int32_t> special = c["ids_special"];
      if (!templ) special.insert(special.begin(), tok->bos());
      EXPECT_EQ(tok->encode(text, true), special);
      EXPECT_EQ(tok->decode(ids), c["decoded"].get<std::string>());
      ++n;
      nonempty += !ids.empty();
    }
    EXPECT_GE(n, 60);
    EXPECT_GE(nonempty, 55);
  }
}

// Streaming: decode_piece of each token, joined, reads as the text after its first token, and
// never strips spaces in the middle (SentencePiece's leading "▁" is stripped only by decode).
TEST(HfTokenizerFamilies, PiecesJoinToTheText) {
  for (const char* name : {"spm_legacy", "metaspace_first", "llama3_bpe"}) {
    SCOPED_TRACE(name);
    auto tok = load_tokenizer((kDir / name).string());
    const std::string text = "Hello world, caf\u00e9 \u65e5\u672c 12345";
    const auto ids = tok->encode(text, true);
    std::string joined;
    Utf8StreamDecoder stream(*tok);
    for (int32_t id : ids) joined += stream.push(id);
    joined += stream.flush();
    EXPECT_EQ(tok->decode(ids), text);
    // The SentencePiece styles add a "▁" before the first word, which decode_piece keeps as ' '.
    EXPECT_TRUE(joined == text || joined == " " + text) << joined;
  }
}

TEST(HfTokenizerFamilies, BosFromTheTemplate) {
  auto tok = load_tokenizer((kDir / "metaspace_first").string());
  const json j = read_json(kDir / "metaspace_first" / "tokenizer.json");
  EXPECT_EQ(tok->bos(), j["model"]["vocab"]["<|startoftext|>"].get<int>());
  auto split = load_tokenizer((kDir / "metaspace_split").string());
  const auto ids = split->encode("a", true);  // <s> a </s>
  ASSERT_GE(ids.size(), 3u);
  EXPECT_EQ(ids.front(), split->bos());
  EXPECT_EQ(ids.back(), read_json(kDir / "metaspace_split" / "tokenizer.json")["model"]["vocab"]["</s>"].get<int>());
}

// Every pre-tokenizer of the fixture (Split with 14 regexes and each behavior, Digits,
// Punctuation, Metaspace, ByteLevel, a Sequence) on 60 texts: the library's pieces.
TEST(HfPreTokenizer, PiecesMatchTokenizers) {
  const json pre = read_json(kDir / "pre_tokenizers.json");
  const auto texts = pre["texts"].get<std::vector<std::string>>();
  int checked = 0;
  for (const auto& [name, v] : pre["pre_tokenizers"].items()) {
    SCOPED_TRACE(name);
    const std::string cfg = v["config"].dump();
    for (size_t i = 0; i < texts.size(); ++i) {
      SCOPED_TRACE(texts[i]);
      EXPECT_EQ(hf_pre_tokenize(cfg, texts[i]), v["pieces"][i].get<std::vector<std::string>>());
      ++checked;
    }
  }
  EXPECT_GE(checked, 23 * 60);
}

// The hand-written GPT-2 split and the same pattern through the regex engine agree.
TEST(TextRegex, Gpt2PatternEqualsTheHandWrittenSplit) {
  const std::string gpt2 = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
  const json pre = read_json(kDir / "pre_tokenizers.json");
  for (const std::string& t : pre["texts"].get<std::vector<std::string>>()) {
    std::vector<std::string> hand;
    for (std::string_view p : gpt2_split(t)) hand.emplace_back(p);
    EXPECT_EQ(matches(gpt2, t), hand) << t;
  }
}

TEST(TextRegex, Semantics) {
  EXPECT_EQ(matches("a|ab", "ab"), (std::vector<std::string>{"a"}));            // first alternative wins
  EXPECT_EQ(matches("ab|a", "ab"), (std::vector<std::string>{"ab"}));
  EXPECT_EQ(matches("a+?", "aaa"), (std::vector<std::string>{"a", "a", "a"}));  // lazy
  EXPECT_EQ(matches("a{2,3}", "aaaaaaa"), (std::vector<std::string>{"aaa", "aaa"}));
  EXPECT_EQ(matches("x*", "ab"), (std::vector<std::string>{"", "", ""}));      // empty matches move on
  EXPECT_EQ(matches("(?i:ab)c", "ABc aBC abc"), (std::vector<std::string>{"ABc", "abc"}));
  EXPECT_EQ(matches("\\s+(?!\\S)|\\s+", "a   b"), (std::vector<std::string>{"  ", " "}));
  EXPECT_EQ(matches("^\\w+|\\w+$", "one two\nthree four"), (std::vector<std::string>{"one", "two", "three", "four"}));
  EXPECT_EQ(matches("\\A\\w|\\w\\z", "ab cd"), (std::vector<std::string>{"a", "d"}));
  EXPECT_EQ(matches("[^\\p{L}\\s]+", "ab12!? c\u00bd"), (std::vector<std::string>{"12!?", "\u00bd"}));
  EXPECT_EQ(matches("\\p{Lu}\\p{Ll}+", "HelloWorld \u00c9t\u00e9"), (std::vector<std::string>{"Hello", "World", "\u00c9t\u00e9"}));
  EXPECT_EQ(matches("\\x{65E5}\\u672c|\\x41", "\u65e5\u672cA"), (std::vector<std::string>{"\u65e5\u672c", "A"}));
  EXPECT_EQ(matches("[\\-a]+|\\.", "a-a.b"), (std::vector<std::string>{"a-a", "."}));
  EXPECT_EQ(matches("(?:ab)+|x{,2}y", "ababxxxy"), (std::vector<std::string>{"abab", "xxy"}));
  EXPECT_EQ(matches("a{x", "a{x"), (std::vector<std::string>{"a{x"}));          // not an interval: literal
}

TEST(TextRegex, RefusesWhatItDoesNotImplement) {
  for (const auto& [pattern, part] : std::vector<std::pair<std::string, std::string>>{
           {"(?<=a)b", "lookbehind"},
           {"\\bword", "\\b"},
           {"(a)\\1", "\\1"},
           {"\\p{Han}+", "\\p{han}"},
           {"a++", "possessive"},
           {"[a-z&&[^aeiou]]", "&&"},
           {"[[:alpha:]]", "nested"},
           {"(?i:\u00e9)", "non-ASCII"},
           {"(?x)a b", "(?"},
           {"(ab", "missing ')'"},
           {"ab)", "unmatched ')'"},
           {"[b-a]", "below its start"},
           {"*a", "nothing to repeat"},
           {"a{3,2}", "m < n"},
           {"a{1000000}", "above 100000"},
       }) {
    SCOPED_TRACE(pattern);
    try {
      TextRegex re(pattern);
      ADD_FAILURE() << "no error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(pattern), std::string::npos) << e.what();
    }
  }
}

// Catastrophic backtracking ends in an error within Oniguruma's retry limit, not a hang, and a
// pattern that fails slowly at every start is bounded over the whole text.
TEST(TextRegex, BacktrackingIsBounded) {
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_THROW(TextRegex("(a|aa)*b").find_all(cps(std::string(40, 'a'))), Error);
  EXPECT_THROW(TextRegex("a[^x]*y").find_all(cps(std::string(20000, 'a'))), Error);
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 60.0);
  // A long run of one class costs no recursion.
  EXPECT_EQ(TextRegex("\\p{L}+").find_all(cps(std::string(1 << 20, 'a'))).size(), 1u);
}

TEST(HfTokenizerFamilies, RefusesWhatItDoesNotImplement) {
  test::TempDir tmp("hf_tok_fam_bad");
  const json orig = read_json(kDir / "llama3_bpe" / "tokenizer.json");
  const auto with = test::tokenizer_refusals(tmp.path, orig);
  with([](json& j) { j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(?<=x)y"; }, {"lookbehind"});
  with([](json& j) { j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Sideways"; },
       {"pre_tokenizer.pretokenizers[0].behavior", "Sideways"});
  with([](json& j) { j["pre_tokenizer"]["pretokenizers"][1] = {{"type", "WhitespaceSplit"}}; },
       {"pre_tokenizer.pretokenizers[1].type", "WhitespaceSplit"});
  with([](json& j) { j["normalizer"] = {{"type", "Lowercase"}}; }, {"normalizer.type", "Lowercase"});
  with([](json& j) { j["decoder"] = {{"type", "WordPiece"}}; }, {"decoder.type", "WordPiece"});
  with([](json& j) { j["post_processor"]["processors"][1]["type"] = "RobertaProcessing"; }, {"RobertaProcessing"});
  with([](json& j) { j["post_processor"]["processors"][1]["single"][0]["SpecialToken"]["id"] = "<nope>"; },
       {"<nope>", "special_tokens"});
  with([](json& j) { j["model"]["unk_token"] = "<missing>"; }, {"model.unk_token", "<missing>"});
  with([](json& j) { j["decoder"] = nullptr; }, {"decoder"});
}

}  // namespace hm
