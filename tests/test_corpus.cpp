#include <gtest/gtest.h>

#include "test_util.h"
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "core/error.h"
#include "data/corpus.h"

namespace hm {
namespace {

namespace fs = std::filesystem;

using TempDir = hm::test::TempDir;

void write(const fs::path& p, const std::string& text) {
  fs::create_directories(p.parent_path());
  std::ofstream f(p, std::ios::binary);
  f << text;
}

std::string load_error(const std::string& path, size_t min_bytes = 0) {
  try {
    load_corpus(path, min_bytes);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

bool has(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// ---- strip_brown_tags ----

TEST(BrownTags, SentenceWithQuotesAndCommas) {
  EXPECT_EQ(strip_brown_tags(
                "\tThe/at jury/nn said/vbd ,/, ``/`` considering/in the/at election/nn ''/'' ./."),
            "The jury said, \"considering the election.\"\n");
  // Form C puts , . ? ! after the closing quote; they go back inside.
  EXPECT_EQ(strip_brown_tags("``/`` Only/rb a/at handful/nn ''/'' ,/, the/at jury/nn said/vbd ./."),
            "\"Only a handful,\" the jury said.\n");
  EXPECT_EQ(strip_brown_tags("``/`` Where/wrb did/dod you/ppss go/vb ''/'' ?/. ?/."),
            "\"Where did you go?\"\n");
  // Mid-sentence quotes glue to their words.
  EXPECT_EQ(strip_brown_tags("produced/vbd ``/`` no/at evidence/nn ''/'' that/cs any/dti ./."),
            "produced \"no evidence\" that any.\n");
}

TEST(BrownTags, OddTagsAndSlashesInWords) {
  // Tags with + - * $ and foreign-word tags; the tag is what follows the LAST slash.
  EXPECT_EQ(strip_brown_tags("It's/pps+bez not/* Georgia's/np$ ,/, shouldn't/md* Sie/fw-pps "
                             "O'Sullivan's/np$-tl hall/nn-tl-hl ;/.-hl"),
            "It's not Georgia's, shouldn't Sie O'Sullivan's hall;\n");
  EXPECT_EQ(strip_brown_tags("and/or/cc 1/2/cd counts/nns //in minute/nn mg/l/hr/nn /l//nn ./."),
            "and/or 1/2 counts / minute mg/l/hr /l/.\n");
  // '' inside a word is inches.
  EXPECT_EQ(strip_brown_tags("a/at 1/4''/nn board/nn"), "a 1/4\" board\n");
  // A token without a tag is kept as it is.
  EXPECT_EQ(strip_brown_tags("plain words/nns here"), "plain words here\n");
}

TEST(BrownTags, PunctuationSpacing) {
  EXPECT_EQ(strip_brown_tags("recommended/vbd that/cs :/: (/( 1/cd )/) four/cd ;/. ;/. and/cc "
                             "[/( Hearst/np ]/) --/-- a/at system/nn !/. !/."),
            "recommended that: (1) four; and [Hearst] -- a system!\n");
  // Brown doubles ; ? ! and keeps the sentence period after an abbreviation.
  EXPECT_EQ(strip_brown_tags("won/vbn by/in Ivan/np Allen/np Jr./np ./."), "won by Ivan Allen Jr.\n");
  EXPECT_EQ(strip_brown_tags("Why/wrb ?/. ?/."), "Why?\n");
  // Standalone ' alternates: opening, then closing.
  EXPECT_EQ(strip_brown_tags("more/ap '/' pro/jj '/' letters/nns than/in '/' con/jj '/' ./."),
            "more 'pro' letters than 'con'.\n");
}

TEST(BrownTags, LinesAndParagraphs) {
  const std::string tagged =
      "\n\n\tThe/at first/od ./.\nA/at second/od line/nn ./. \r\n\n\n"
      "\tNew/jj paragraph/nn ./.\n\n\nAfter/in blanks/nns ./.\n";
  EXPECT_EQ(strip_brown_tags(tagged),
            "The first.\nA second line.\n\nNew paragraph.\n\nAfter blanks.\n");
  EXPECT_EQ(strip_brown_tags(""), "");
  EXPECT_EQ(strip_brown_tags("\n\n \t\n"), "");
  EXPECT_EQ(strip_brown_tags(tagged), strip_brown_tags(tagged));  // deterministic
}

// ---- load_corpus ----

TEST(Corpus, SingleFile) {
  TempDir dir("corpus_single");
  write(dir.path / "doc.txt", "\xEF\xBB\xBFhéllo\nworld\n");  // BOM dropped
  const Corpus c = load_corpus((dir.path / "doc.txt").string());
  ASSERT_EQ(c.documents.size(), 1u);
  EXPECT_EQ(c.documents[0], "héllo\nworld\n");
  EXPECT_EQ(c.names, std::vector<std::string>{"doc.txt"});
}

TEST(Corpus, FolderIsSortedRecursiveAndSkipsHidden) {
  TempDir dir("corpus_folder");
  write(dir.path / "b.txt", "b");
  write(dir.path / "a.txt", "a");
  write(dir.path / "Z.txt", "Z");  // bytewise: uppercase first
  write(dir.path / "a" / "z.txt", "az");
  write(dir.path / "sub" / "deep" / "c.md", "c");
  write(dir.path / ".hidden", "\xFF");  // would be invalid UTF-8 if read
  write(dir.path / ".git" / "HEAD", "\xFF");
  write(dir.path / "sub" / ".cache" / "x", "\xFF");
  write(dir.path / "empty.txt", "");
  const Corpus c = load_corpus(dir.str());
  EXPECT_EQ(c.names, (std::vector<std::string>{"Z.txt", "a.txt", "a/z.txt", "b.txt", "sub/deep/c.md"}));
  EXPECT_EQ(c.documents, (std::vector<std::string>{"Z", "a", "az", "b", "c"}));
  EXPECT_EQ(load_corpus(dir.str()).names, c.names);
}

TEST(Corpus, BrownFolderIsDetectedAndStripped) {
  TempDir dir("corpus_brown");
  write(dir.path / "cb02", "\n\n\tSecond/od text/nn ./.\n");
  write(dir.path / "ca01", "\n\n\tThe/at Fulton/np-tl County/nn-tl said/vbd ./.\n");
  write(dir.path / "README", "BROWN CORPUS\n");
  write(dir.path / "cats.txt", "ca01 news\n");
  write(dir.path / "corpus.tgz", std::string("\x1F\x8B\x08\x00\xFF", 5));  // ignored, not read
  const Corpus c = load_corpus(dir.str());
  EXPECT_EQ(c.names, (std::vector<std::string>{"ca01", "cb02"}));
  EXPECT_EQ(c.documents, (std::vector<std::string>{"The Fulton County said.\n", "Second text.\n"}));
  // A single Brown file is stripped too.
  EXPECT_EQ(load_corpus((dir.path / "ca01").string()).documents[0], "The Fulton County said.\n");
}

TEST(Corpus, BrownNameWithPlainTextIsNotStripped) {
  TempDir dir("corpus_notbrown");
  write(dir.path / "ca01", "An ordinary note about 1/2 of the work.\n");
  write(dir.path / "notes.txt", "More notes.\n");
  const Corpus c = load_corpus(dir.str());
  EXPECT_EQ(c.names, (std::vector<std::string>{"ca01", "notes.txt"}));
  EXPECT_EQ(c.documents[0], "An ordinary note about 1/2 of the work.\n");
}

TEST(Corpus, Errors) {
  TempDir dir("corpus_errors");
  const std::string missing = (dir.path / "nope").string();
  std::string msg = load_error(missing);
  EXPECT_TRUE(has(msg, missing) && has(msg, "no such")) << msg;

  write(dir.path / "empty.txt", "");
  msg = load_error((dir.path / "empty.txt").string());
  EXPECT_TRUE(has(msg, "empty.txt") && has(msg, "empty")) << msg;

  fs::create_directories(dir.path / "void");
  msg = load_error((dir.path / "void").string());
  EXPECT_TRUE(has(msg, "void") && has(msg, "no non-empty files")) << msg;

  write(dir.path / "onlyhidden" / ".x", "text");
  write(dir.path / "onlyhidden" / "e", "");
  msg = load_error((dir.path / "onlyhidden").string());
  EXPECT_TRUE(has(msg, "onlyhidden") && has(msg, "no non-empty files")) << msg;

  write(dir.path / "bad.txt", "abc\xFF" "def");
  msg = load_error((dir.path / "bad.txt").string());
  EXPECT_TRUE(has(msg, "bad.txt") && has(msg, "UTF-8") && has(msg, "offset 3")) << msg;

  // In a folder, the bad file is named; a truncated character at the end counts.
  write(dir.path / "mixed" / "good.txt", "fine\n");
  write(dir.path / "mixed" / "worse.txt", "ok \xE2\x82");
  msg = load_error((dir.path / "mixed").string());
  EXPECT_TRUE(has(msg, "worse.txt") && has(msg, "offset 3")) << msg;

  // Overlong encodings and surrogates are not UTF-8 either.
  write(dir.path / "overlong.txt", "xy\xC0\xAF");
  EXPECT_TRUE(has(load_error((dir.path / "overlong.txt").string()), "offset 2"));

  write(dir.path / "small" / "a.txt", "12345");
  write(dir.path / "small" / "b.txt", "678");
  msg = load_error((dir.path / "small").string(), 9);
  EXPECT_TRUE(has(msg, "small") && has(msg, "8 bytes") && has(msg, "9")) << msg;
  EXPECT_EQ(load_error((dir.path / "small").string(), 8), "");
}

// ---- split_documents ----

Corpus numbered(size_t n) {
  Corpus c;
  for (size_t i = 0; i < n; ++i) {
    c.documents.push_back("document " + std::to_string(i) + "\n");
    c.names.push_back("doc" + std::to_string(i) + ".txt");
  }
  return c;
}

void expect_partition(const Split& s, size_t n) {
  std::vector<size_t> all = s.train;
  all.insert(all.end(), s.valid.begin(), s.valid.end());
  std::sort(all.begin(), all.end());
  std::vector<size_t> want(n);
  for (size_t i = 0; i < n; ++i) want[i] = i;
  EXPECT_EQ(all, want);  // disjoint and complete
  EXPECT_TRUE(std::is_sorted(s.train.begin(), s.train.end()));
  EXPECT_TRUE(std::is_sorted(s.valid.begin(), s.valid.end()));
  EXPECT_EQ(s.cut, 0u);
}

TEST(Split, DeterministicDisjointAndSized) {
  const Corpus c = numbered(50);
  const Split a = split_documents(c, 0.1, 7);
  expect_partition(a, 50);
  EXPECT_EQ(a.valid.size(), 5u);
  const Split b = split_documents(c, 0.1, 7);
  EXPECT_EQ(a.train, b.train);
  EXPECT_EQ(a.valid, b.valid);
  // Pinned: the keys are integer hashes, so this holds on every machine and compiler.
  EXPECT_EQ(a.valid, (std::vector<size_t>{13, 21, 37, 39, 49}));
  bool differs = false;  // another seed picks other documents
  for (uint64_t seed = 8; seed < 12; ++seed) differs |= split_documents(c, 0.1, seed).valid != a.valid;
  EXPECT_TRUE(differs);
}

TEST(Split, KeyedOnNamesNotOrder) {
  Corpus c = numbered(20);
  const Split a = split_documents(c, 0.25, 3);
  std::reverse(c.documents.begin(), c.documents.end());
  std::reverse(c.names.begin(), c.names.end());
  const Split b = split_documents(c, 0.25, 3);
  std::vector<std::string> va, vb;
  for (size_t i : a.valid) va.push_back("doc" + std::to_string(i) + ".txt");
  for (size_t i : b.valid) vb.push_back(c.names[i]);
  std::sort(va.begin(), va.end());
  std::sort(vb.begin(), vb.end());
  EXPECT_EQ(va, vb);
}

TEST(Split, AtLeastOneOnEachSide) {
  const Corpus two = numbered(2);
  for (double f : {0.001, 0.5, 0.999}) {
    const Split s = split_documents(two, f, 1);
    expect_partition(s, 2);
    EXPECT_EQ(s.train.size(), 1u);
    EXPECT_EQ(s.valid.size(), 1u);
  }
  Corpus unnamed = numbered(10);
  unnamed.names.clear();  // falls back to indices
  const Split s = split_documents(unnamed, 0.3, 5);
  expect_partition(s, 10);
  EXPECT_EQ(s.valid.size(), 3u);
  EXPECT_EQ(split_documents(unnamed, 0.3, 5).valid, s.valid);
  const auto tv = train_texts(unnamed, s), vv = valid_texts(unnamed, s);
  EXPECT_EQ(tv.size(), 7u);
  EXPECT_EQ(vv.size(), 3u);
  EXPECT_EQ(vv[0], unnamed.documents[s.valid[0]]);
}

TEST(Split, SingleDocumentIsCutAtALine) {
  Corpus c;
  c.documents = {""};
  for (int i = 0; i < 10; ++i) c.documents[0] += "line " + std::to_string(i) + "\n";  // 7 bytes each
  c.names = {"one.txt"};
  const Split s = split_documents(c, 0.2, 99);
  EXPECT_EQ(s.train, std::vector<size_t>{0});
  EXPECT_EQ(s.valid, std::vector<size_t>{0});
  EXPECT_EQ(s.cut, 56u);  // the last 2 of 10 lines validate
  const auto tv = train_texts(c, s), vv = valid_texts(c, s);
  ASSERT_EQ(tv.size(), 1u);
  ASSERT_EQ(vv.size(), 1u);
  EXPECT_EQ(vv[0], "line 8\nline 9\n");
  EXPECT_EQ(std::string(tv[0]) + std::string(vv[0]), c.documents[0]);
  EXPECT_EQ(split_documents(c, 0.2, 1).cut, s.cut);  // seed does not matter

  // Tiny fractions still leave a line to validate; blank lines are not cut points.
  c.documents[0] = "first\nsecond\n\n\n";
  EXPECT_EQ(split_documents(c, 0.01, 0).cut, 6u);
  EXPECT_EQ(split_documents(c, 0.99, 0).cut, 6u);
}

TEST(Split, Errors) {
  EXPECT_THROW(split_documents(Corpus{}, 0.1, 0), Error);
  const Corpus c = numbered(5);
  for (double f : {0.0, 1.0, -0.1, 1.5, std::numeric_limits<double>::quiet_NaN()}) {
    try {
      split_documents(c, f, 0);
      ADD_FAILURE() << "fraction " << f << " accepted";
    } catch (const Error& e) {
      EXPECT_TRUE(has(e.what(), "valid_fraction")) << e.what();
    }
  }
  Corpus one;
  one.documents = {"a single line without a break\n"};
  one.names = {"one.txt"};
  try {
    split_documents(one, 0.1, 0);
    ADD_FAILURE() << "one-line document split";
  } catch (const Error& e) {
    EXPECT_TRUE(has(e.what(), "one.txt")) << e.what();
  }
}

// ---- the real Brown corpus (scripts/fetch_brown.sh) ----

TEST(BrownCorpus, StrippedTextOfTheRealCorpus) {
#ifdef HM_SOURCE_DIR
  const std::string root = HM_SOURCE_DIR;
#else
  const std::string root = "";
#endif
  const std::string path = brown_default_path(root);
  if (!fs::exists(fs::path(path) / "ca01")) GTEST_SKIP() << "run scripts/fetch_brown.sh for " << path;
  const Corpus c = load_corpus(path, 5'000'000);
  ASSERT_EQ(c.documents.size(), 500u);
  EXPECT_EQ(c.names.front(), "ca01");
  EXPECT_EQ(c.names.back(), "cr09");
  const std::string start =
      "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary "
      "election produced \"no evidence\" that any irregularities took place.\n\n"
      "The jury further said in term-end presentments that the City Executive Committee, which "
      "had over-all charge of the election, \"deserves the praise and thanks of the City of "
      "Atlanta\" for the manner in which the election was conducted.\n";
  EXPECT_EQ(c.documents[0].substr(0, start.size()), start);
  size_t total = 0;
  for (const std::string& d : c.documents) {
    total += d.size();
    EXPECT_FALSE(has(d, "/nn ") || has(d, "/at ") || has(d, "``") || has(d, " ,")) << "tags left";
  }
  EXPECT_GT(total, 5'500'000u);
  EXPECT_LT(total, 6'500'000u);
  const Split s = split_documents(c, 0.05, 1);
  EXPECT_EQ(s.valid.size(), 25u);
  EXPECT_EQ(s.train.size(), 475u);
}

}  // namespace
}  // namespace hm
