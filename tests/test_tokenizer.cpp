#include <gtest/gtest.h>

#include "test_util.h"
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "runtime/tokenizer.h"

namespace hm {
namespace {

namespace fs = std::filesystem;

const std::string kFffd = "\xEF\xBF\xBD";

using TempDir = hm::test::TempDir;

void write(const fs::path& p, const std::string& text) {
  std::ofstream f(p, std::ios::binary);
  f << text;
}

std::string load_error(const std::string& dir) {
  try {
    load_tokenizer(dir);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Tokenizer, ByteRoundTrip) {
  ByteTokenizer tok;
  EXPECT_EQ(tok.type(), "byte");
  EXPECT_EQ(tok.vocab_size(), 259);
  for (const std::string& text :
       std::vector<std::string>{"", "hello, world\n", "héllo wörld ✓ 🚀", std::string("a\0b\xFF", 4)}) {
    const auto ids = tok.encode(text, false);
    ASSERT_EQ(ids.size(), text.size());
    for (int32_t id : ids) {
      EXPECT_GE(id, 0);
      EXPECT_LT(id, 256);
    }
    EXPECT_EQ(tok.decode(ids), text);
  }
}

TEST(Tokenizer, AddBosAndSpecials) {
  ByteTokenizer tok;
  const auto ids = tok.encode("hi", true);
  EXPECT_EQ(ids, (std::vector<int32_t>{256, 'h', 'i'}));
  EXPECT_EQ(tok.bos(), 256);
  EXPECT_EQ(tok.eos(), 257);
  EXPECT_EQ(tok.pad(), 258);
  for (int id : {256, 257, 258}) EXPECT_EQ(tok.decode_piece(id), "");
  EXPECT_EQ(tok.decode({256, 'o', 'k', 257, 258}), "ok");
}

TEST(Tokenizer, OutOfRangeIdThrows) {
  ByteTokenizer tok;
  EXPECT_THROW(tok.decode_piece(-1), Error);
  EXPECT_THROW(tok.decode_piece(259), Error);
  EXPECT_THROW(tok.decode({'a', 1000}), Error);
  Utf8StreamDecoder dec(tok);
  EXPECT_THROW(dec.push(300), Error);
}

TEST(Utf8Stream, MultiByteOneByteAtATime) {
  ByteTokenizer tok;
  const std::string text = "héllo wörld ✓ 🚀!";
  Utf8StreamDecoder dec(tok);
  std::string got;
  int held = 0;  // pushes that returned nothing: the non-final bytes of multi-byte characters
  for (int32_t id : tok.encode(text, true)) {
    const std::string piece = dec.push(id);
    EXPECT_TRUE(is_valid_utf8(piece)) << "partial character emitted";
    if (piece.empty()) ++held;
    got += piece;
  }
  got += dec.flush();
  EXPECT_EQ(got, text);
  // é ö: 1 held each, ✓: 2, 🚀: 3, plus <bos> which decodes to "".
  EXPECT_EQ(held, 1 + 1 + 2 + 3 + 1);
}

TEST(Utf8Stream, EmojiEmittedOnlyWhenComplete) {
  ByteTokenizer tok;
  Utf8StreamDecoder dec(tok);
  const std::string rocket = "🚀";
  ASSERT_EQ(rocket.size(), 4u);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(dec.push(static_cast<unsigned char>(rocket[i])), "");
  EXPECT_EQ(dec.push(static_cast<unsigned char>(rocket[3])), rocket);
  EXPECT_EQ(dec.flush(), "");
}

TEST(Utf8Stream, InvalidBytesBecomeReplacement) {
  ByteTokenizer tok;
  auto feed = [&](const std::string& bytes) {
    Utf8StreamDecoder dec(tok);
    std::string out;
    for (unsigned char b : bytes) out += dec.push(b);
    return out + "|" + dec.flush();
  };
  // Truncated character at the end: held back by push, replaced at flush.
  EXPECT_EQ(feed("a\xC3"), "a|" + kFffd);
  EXPECT_EQ(feed("\xF0\x9F\x9A"), "|" + kFffd);
  // Bytes that can never start a character are replaced at once.
  EXPECT_EQ(feed("\xFF" "b"), kFffd + "b|");
  EXPECT_EQ(feed("\x80"), kFffd + "|");
  // A character cut short by a non-continuation: one U+FFFD for the cut part, then go on.
  EXPECT_EQ(feed("\xE2\x9C" "b"), kFffd + "b|");
  // Overlong and surrogate encodings are ill-formed.
  EXPECT_EQ(feed("\xC0\xAF"), kFffd + kFffd + "|");
  EXPECT_EQ(feed("\xED\xA0\x80"), kFffd + kFffd + kFffd + "|");
  // Flush leaves the decoder empty.
  Utf8StreamDecoder dec(tok);
  dec.push(0xC3);
  EXPECT_EQ(dec.flush(), kFffd);
  EXPECT_EQ(dec.flush(), "");
  EXPECT_EQ(dec.push('z'), "z");
}

TEST(Utf8Stream, SpecialsInsideACharacterDoNotBreakIt) {
  ByteTokenizer tok;
  Utf8StreamDecoder dec(tok);
  EXPECT_EQ(dec.push(0xC3), "");
  EXPECT_EQ(dec.push(tok.pad()), "");
  EXPECT_EQ(dec.push(0xA9), "é");
}

TEST(Utf8, Validity) {
  EXPECT_TRUE(is_valid_utf8(""));
  EXPECT_TRUE(is_valid_utf8("héllo wörld ✓ 🚀"));
  EXPECT_TRUE(is_valid_utf8("\xF4\x8F\xBF\xBF"));   // U+10FFFF
  EXPECT_FALSE(is_valid_utf8("\xF4\x90\x80\x80"));  // above U+10FFFF
  EXPECT_FALSE(is_valid_utf8("\xC0\x80"));          // overlong NUL
  EXPECT_FALSE(is_valid_utf8("\xE0\x80\x80"));      // overlong
  EXPECT_FALSE(is_valid_utf8("\xED\xA0\x80"));      // surrogate
  EXPECT_FALSE(is_valid_utf8("\xC3"));              // truncated
  EXPECT_FALSE(is_valid_utf8("\xFF"));
}

TEST(Tokenizer, SaveLoadRoundTrip) {
  TempDir dir("tok_save");
  const std::string sub = (dir.path / "model").string();  // save creates the directory
  ByteTokenizer().save(sub);
  EXPECT_TRUE(fs::exists(fs::path(sub) / "tokenizer.json"));
  int files = 0;  // no temp file left behind
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(sub)) ++files;
  EXPECT_EQ(files, 1);
  auto tok = load_tokenizer(sub);
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->type(), "byte");
  EXPECT_EQ(tok->vocab_size(), 259);
  EXPECT_EQ(tok->decode(tok->encode("héllo", true)), "héllo");
  ByteTokenizer().save(sub);  // overwriting works too
  EXPECT_EQ(load_tokenizer(sub)->type(), "byte");
}

// No silent fallback to bytes: a checkpoint without tokenizer.json is an error saying how to
// declare a byte-level model; a task checkpoint's error names its task.
TEST(Tokenizer, MissingFileIsAnError) {
  TempDir dir("tok_missing");
  std::string msg = load_error(dir.str());
  EXPECT_NE(msg.find((dir.path / "tokenizer.json").string() + " does not exist"), std::string::npos) << msg;
  EXPECT_NE(msg.find("{\"type\": \"byte\"}"), std::string::npos) << msg;
  write(dir.path / "trainer_state.json", "{\"settings\": {\"task\": {\"name\": \"mqar\"}}}");
  msg = load_error(dir.str());
  EXPECT_NE(msg.find("synthetic task 'mqar'"), std::string::npos) << msg;
  write(dir.path / "trainer_state.json", "{\"settings\": {\"seq_len\": 8}}");  // a text run
  EXPECT_NE(load_error(dir.str()).find("does not exist"), std::string::npos);
  ByteTokenizer().save(dir.str());  // the explicit byte tokenizer loads
  EXPECT_EQ(load_tokenizer(dir.str())->type(), "byte");
}

TEST(Tokenizer, BadFilesAreRejectedNamingFileAndField) {
  TempDir dir("tok_bad");
  const auto file = dir.path / "tokenizer.json";
  struct Case { const char* text; const char* mention; };
  for (const Case& c : {Case{"{\"type\": \"byte\"", "invalid JSON"}, Case{"not json", "invalid JSON"},
                        Case{"[\"byte\"]", "object"}, Case{"{}", "'type'"},
                        Case{"{\"type\": 3}", "'type'"}, Case{"{\"type\": \"wordpiece\"}", "wordpiece"},
                        Case{"{\"type\": \"byte\", \"modle\": \"x\"}", "unknown field 'modle'"},
                        Case{"{\"type\": \"byte\", \"type\": \"sentencepiece\"}", "'type' appears twice"},
                        Case{"{\"type\": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]}",
                             "deeper than"},
                        Case{"{\"type\": \"sentencepiece\", \"model\": \"tokenizer.model\"}", "sentencepiece"}}) {
    write(file, c.text);
    const std::string msg = load_error(dir.str());
    EXPECT_NE(msg.find("tokenizer.json"), std::string::npos) << c.text << " -> " << msg;
    EXPECT_NE(msg.find(c.mention), std::string::npos) << c.text << " -> " << msg;
  }
}

}  // namespace
}  // namespace hm
