#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "test_util.h"
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "runtime/tokenizer.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

namespace hm {
namespace {

namespace fs = std::filesystem;

constexpr int kVocab = 400;

using TempDir = hm::test::TempDir;

std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void write(const fs::path& p, const std::string& text) {
  std::ofstream f(p, std::ios::binary);
  f << text;
}

// About 9 KB of seeded pseudo-English in 3 documents, with a few accented words.
std::vector<std::string> training_texts() {
  static const char* words[] = {
      "the", "state", "space", "model", "reads", "a", "long", "sequence", "of", "tokens",
      "and", "attention", "layers", "mix", "information", "between", "positions", "while",
      "mamba", "blocks", "carry", "it", "forward", "in", "time", "with", "constant", "memory",
      "training", "needs", "data", "from", "corpus", "tokenizer", "learns", "pieces", "that",
      "compress", "text", "into", "fewer", "ids", "café", "naïve", "über", "résumé", "is",
      "to", "on", "for", "this", "every", "new", "word", "seen", "before", "after", "2024",
  };
  constexpr size_t n_words = sizeof(words) / sizeof(words[0]);
  Rng rng(42);
  std::vector<std::string> docs(3);
  for (std::string& doc : docs) {
    for (int s = 0; s < 60; ++s) {
      const int len = 5 + static_cast<int>(rng.next_u64() % 8);
      std::string sentence;
      for (int w = 0; w < len; ++w) {
        std::string word = words[rng.next_u64() % n_words];
        if (w == 0 && word[0] >= 'a' && word[0] <= 'z') word[0] = static_cast<char>(word[0] - 32);
        sentence += (w ? " " : "") + word;
      }
      doc += sentence + (rng.next_u64() % 4 == 0 ? ", said the model.\n" : ".\n");
    }
  }
  return docs;
}

class Bpe : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir("bpe_suite");
    train_sentencepiece_bpe(training_texts(), kVocab, dir_->str());
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }
  static std::unique_ptr<Tokenizer> load() { return load_tokenizer(dir_->str()); }
  static TempDir* dir_;
};
TempDir* Bpe::dir_ = nullptr;

const std::vector<std::string>& round_trip_texts() {
  static const std::vector<std::string> texts = {
      "",
      "The state space model reads a long sequence of tokens.",
      "  leading spaces, double  spaces and trailing ones  ",
      "tabs\tand\nnew lines\n\nand CRLF\r\n",
      "Punctuation!? (brackets) [x] {y} \"quotes\" 'single' -- 3.14159 = 22/7; 100% #1 @home",
      "café naïve über résumé",                  // multi-byte, seen in training
      "日本語のテキスト, Ωμέγα, Привет, 🚀🦀✓",  // multi-byte, never seen: byte fallback
  };
  return texts;
}

TEST_F(Bpe, FilesAndSpecialIds) {
  EXPECT_TRUE(fs::is_regular_file(dir_->path / "tokenizer.model"));
  int files = 0;  // no temp file left behind
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir_->path)) ++files;
  EXPECT_EQ(files, 2);
  const auto j = slurp(dir_->path / "tokenizer.json");
  EXPECT_NE(j.find("\"sentencepiece\""), std::string::npos) << j;
  EXPECT_NE(j.find("\"tokenizer.model\""), std::string::npos) << j;

  const auto tok = load();
  EXPECT_EQ(tok->type(), "sentencepiece");
  EXPECT_EQ(tok->vocab_size(), kVocab);
  EXPECT_EQ(tok->pad(), 0);
  EXPECT_EQ(tok->bos(), 2);
  EXPECT_EQ(tok->eos(), 3);
  for (int id : {0, 2, 3}) EXPECT_EQ(tok->decode_piece(id), "");
  // ids 4..259 are the bytes 0x00..0xFF.
  for (int b = 0; b < 256; ++b) EXPECT_EQ(tok->decode_piece(4 + b), std::string(1, static_cast<char>(b)));
  for (int id = 260; id < kVocab; ++id) EXPECT_FALSE(tok->decode_piece(id).empty()) << id;
  EXPECT_THROW(tok->decode_piece(-1), Error);
  EXPECT_THROW(tok->decode_piece(kVocab), Error);
}

TEST_F(Bpe, RoundTripAsciiAndUtf8) {
  const auto tok = load();
  for (const std::string& text : round_trip_texts()) {
    const auto ids = tok->encode(text, false);
    EXPECT_EQ(tok->decode(ids), text);
    for (int32_t id : ids) {
      EXPECT_GE(id, 4) << "special id in the encoding of " << text;
      EXPECT_LT(id, kVocab);
    }
    const auto with_bos = tok->encode(text, true);
    ASSERT_EQ(with_bos.size(), ids.size() + 1);
    EXPECT_EQ(with_bos[0], tok->bos());
    EXPECT_EQ(tok->decode(with_bos), text);
  }
  // Merges compress text like the training data.
  const std::string seen = "The training data from the corpus learns pieces that compress text.";
  EXPECT_LT(tok->encode(seen, false).size(), seen.size() / 2);
}

TEST_F(Bpe, UnseenCharactersFallBackToBytes) {
  const auto tok = load();
  const std::string text = "日本🚀";  // 3 + 3 + 4 bytes, none in the training text
  const auto ids = tok->encode(text, false);
  ASSERT_EQ(ids.size(), text.size());
  for (size_t i = 0; i < ids.size(); ++i)
    EXPECT_EQ(ids[i], 4 + static_cast<unsigned char>(text[i]));
  // A character from training is one piece, not bytes.
  EXPECT_EQ(tok->encode("é", false).size(), 1u);
}

TEST_F(Bpe, StreamDecodingEqualsDecode) {
  const auto tok = load();
  for (const std::string& text : round_trip_texts()) {
    const auto ids = tok->encode(text, true);
    Utf8StreamDecoder dec(*tok);
    std::string streamed;
    for (int32_t id : ids) {
      const std::string part = dec.push(id);
      EXPECT_TRUE(is_valid_utf8(part)) << "partial character emitted for " << text;
      streamed += part;
    }
    streamed += dec.flush();
    EXPECT_EQ(streamed, tok->decode(ids));
    EXPECT_EQ(streamed, text);
  }
}

TEST_F(Bpe, SaveLoadRoundTripGivesIdenticalIds) {
  const auto tok = load();
  TempDir other("bpe_save");
  const std::string sub = (other.path / "nested").string();  // save creates it
  tok->save(sub);
  EXPECT_EQ(slurp(fs::path(sub) / "tokenizer.model"), slurp(dir_->path / "tokenizer.model"));
  const auto again = load_tokenizer(sub);
  EXPECT_EQ(again->type(), "sentencepiece");
  EXPECT_EQ(again->vocab_size(), tok->vocab_size());
  for (const std::string& text : round_trip_texts())
    EXPECT_EQ(again->encode(text, true), tok->encode(text, true));
  for (int id = 0; id < kVocab; ++id) EXPECT_EQ(again->decode_piece(id), tok->decode_piece(id));
  // The model file can also be loaded directly.
  SentencePieceTokenizer direct((fs::path(sub) / "tokenizer.model").string());
  EXPECT_EQ(direct.encode("café time", false), tok->encode("café time", false));
}

TEST_F(Bpe, TrainingIsDeterministic) {
  TempDir other("bpe_again");
  train_sentencepiece_bpe(training_texts(), kVocab, other.str());
  EXPECT_EQ(slurp(other.path / "tokenizer.model"), slurp(dir_->path / "tokenizer.model"));
  train_sentencepiece_bpe(training_texts(), kVocab + 20, other.str());  // overwrites
  EXPECT_NE(slurp(other.path / "tokenizer.model"), slurp(dir_->path / "tokenizer.model"));
  EXPECT_EQ(load_tokenizer(other.str())->vocab_size(), kVocab + 20);
}

TEST_F(Bpe, CorruptOrMissingModelIsRejectedNamingTheFile) {
  TempDir other("bpe_corrupt");
  const std::string good = slurp(dir_->path / "tokenizer.model");
  write(other.path / "tokenizer.json", slurp(dir_->path / "tokenizer.json"));
  const auto model = other.path / "tokenizer.model";
  auto error = [&] {
    try {
      load_tokenizer(other.str());
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  std::string msg = error();  // no model file yet
  EXPECT_NE(msg.find("tokenizer.model"), std::string::npos) << msg;
  EXPECT_NE(msg.find("does not exist"), std::string::npos) << msg;
  for (const std::string& bad : {std::string(), std::string("not a model at all\n"),
                                 good.substr(0, good.size() / 2), std::string(64, '\xFF')}) {
    write(model, bad);
    msg = error();
    EXPECT_NE(msg.find("tokenizer.model"), std::string::npos) << bad.size() << " bytes: " << msg;
  }
  write(model, good);
  EXPECT_EQ(error(), "");
  // A "model" field of the wrong type is named.
  write(other.path / "tokenizer.json", "{\"type\": \"sentencepiece\", \"model\": 5}");
  msg = error();
  EXPECT_NE(msg.find("'model'"), std::string::npos) << msg;
  EXPECT_THROW(SentencePieceTokenizer((other.path / "absent.model").string()), Error);
}

// "model" names a file inside the model directory: a valid model elsewhere, reached by an
// absolute path, '..' or a symlink, is refused naming the field; a name in a subfolder, or a
// symlink that stays inside, is fine.
TEST_F(Bpe, ModelFileMustStayInsideTheDirectory) {
  TempDir outer("bpe_paths");
  const fs::path dir = outer.path / "model";
  fs::create_directories(dir / "sub");
  const std::string good = slurp(dir_->path / "tokenizer.model");
  write(outer.path / "outside.model", good);
  write(dir / "sub" / "inside.model", good);
  fs::create_symlink(outer.path / "outside.model", dir / "link_out.model");
  fs::create_symlink("../outside.model", dir / "sub" / "rel_out.model");
  fs::create_symlink("sub/inside.model", dir / "link_in.model");
  fs::create_symlink(outer.path, dir / "up");  // a symlinked folder that leaves the directory
  auto load_with = [&](const std::string& name) {
    write(dir / "tokenizer.json", nlohmann::json{{"type", "sentencepiece"}, {"model", name}}.dump());
    try {
      load_tokenizer(dir.string());
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  for (const std::string& bad : {(outer.path / "outside.model").string(), std::string("../outside.model"),
                                 std::string("sub/../../outside.model"), std::string("link_out.model"),
                                 std::string("sub/rel_out.model"), std::string("up/outside.model"),
                                 std::string("")}) {
    const std::string msg = load_with(bad);
    EXPECT_NE(msg.find((dir / "tokenizer.json").string()), std::string::npos) << bad << ": " << msg;
    EXPECT_NE(msg.find("field 'model'"), std::string::npos) << bad << ": " << msg;
  }
  EXPECT_EQ(load_with("sub/inside.model"), "");
  EXPECT_EQ(load_with("link_in.model"), "");
  EXPECT_EQ(load_with("./sub/inside.model"), "");
}

TEST(BpeTraining, BadInputsAreRejected) {
  TempDir dir("bpe_badtrain");
  EXPECT_THROW(train_sentencepiece_bpe(training_texts(), 100, dir.str()), Error);
  EXPECT_THROW(train_sentencepiece_bpe({}, kVocab, dir.str()), Error);
  EXPECT_THROW(train_sentencepiece_bpe({"", "\n\n"}, kVocab, dir.str()), Error);
  try {  // more pieces than the text can make
    train_sentencepiece_bpe({"tiny text\n"}, 5000, dir.str());
    ADD_FAILURE() << "vocab 5000 on 10 bytes accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("vocab_size 5000"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(dir.path / "tokenizer.json"));
}

}  // namespace
}  // namespace hm

namespace hm {

// A Hugging Face folder with only tokenizer.model (Llama 2 style: a dummy prefix, no pad):
// config.json's ids, SentencePiece's own ids for the text, and transformers' decode (no
// leading space); hm convert's save keeps the ids.
TEST(HfSentencePiece, FolderWithOnlyTokenizerModel) {
  TempDir tmp("hf_spm");
  std::string model;
  {
    std::string corpus;
    for (const std::string& t : training_texts()) corpus += t + "\n";
    const fs::path txt = tmp.path / "corpus.txt";
    write(txt, corpus);
    const auto st = sentencepiece::SentencePieceTrainer::Train(
        "--input=" + txt.string() + " --model_prefix=" + (tmp.path / "m").string() +
        " --model_type=bpe --vocab_size=400 --byte_fallback=true --pad_id=-1 --unk_id=0 --bos_id=1 --eos_id=2"
        " --add_dummy_prefix=true --minloglevel=2 --num_threads=1");
    ASSERT_TRUE(st.ok()) << st.ToString();
  }
  const fs::path dir = tmp.path / "hf";
  fs::create_directories(dir);
  fs::copy_file(tmp.path / "m.model", dir / "tokenizer.model");
  write(dir / "config.json", R"({"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2})");
  auto tok = load_tokenizer(dir.string());
  EXPECT_EQ(tok->type(), "sentencepiece");
  EXPECT_EQ(tok->bos(), 1);
  EXPECT_EQ(tok->eos(), 2);
  EXPECT_EQ(tok->pad(), -1);
  sentencepiece::SentencePieceProcessor sp;
  ASSERT_TRUE(sp.Load((dir / "tokenizer.model").string()).ok());
  const std::string text = "the cat sat on the mat, caf\u00e9 \u65e5";
  std::vector<int> want;
  ASSERT_TRUE(sp.Encode(text, &want).ok());
  want.insert(want.begin(), 1);
  const auto ids = tok->encode(text, true);
  EXPECT_EQ(ids, std::vector<int32_t>(want.begin(), want.end()));
  std::string spm_text;
  ASSERT_TRUE(sp.Decode(want, &spm_text).ok());
  EXPECT_EQ(tok->decode(ids), spm_text);
  EXPECT_EQ(tok->decode(ids), text);
  EXPECT_EQ(tok->decode_piece(ids[1])[0], ' ');  // mid-text view keeps the prefix space
  const fs::path out = tmp.path / "converted";
  tok->save(out.string());
  auto again = load_tokenizer(out.string());
  EXPECT_EQ(again->bos(), 1);
  EXPECT_EQ(again->pad(), -1);
  EXPECT_EQ(again->encode(text, true), ids);
  // Without config.json's ids, a model with no pad is refused, naming it.
  fs::remove(dir / "config.json");
  write(dir / "tokenizer.json", R"({"type": "sentencepiece"})");
  try {
    load_tokenizer(dir.string());
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("pad"), std::string::npos) << e.what();
  }
}

}  // namespace hm
