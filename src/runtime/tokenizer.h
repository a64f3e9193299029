// Tokenizers and streaming UTF-8 output. A model directory names its tokenizer in
// tokenizer.json, byte-level included ({"type": "byte"}).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/unicode.h"

namespace sentencepiece {
class SentencePieceProcessor;
}  // namespace sentencepiece

namespace hm {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual std::string type() const = 0;
  virtual int vocab_size() const = 0;  // ids this tokenizer can produce and decode
  virtual int bos() const = 0;
  virtual int eos() const = 0;
  virtual int pad() const = 0;
  // eos, or one of the further ids a model stops at (a Hugging Face folder's eos_token_id list in
  // config.json or generation_config.json: chat models end a turn with a token of their own).
  bool is_eos(int32_t id) const;
  const std::vector<int32_t>& more_eos() const { return more_eos_; }
  void set_more_eos(std::vector<int32_t> ids) { more_eos_ = std::move(ids); }
  virtual std::vector<int32_t> encode(std::string_view text, bool add_bos) const = 0;
  // Raw bytes of one token ("" for specials); hm::Error for an id out of range.
  virtual std::string decode_piece(int32_t id) const = 0;
  // The text of a whole sequence: by default the concatenated pieces, raw bytes, not
  // necessarily valid UTF-8 (see Utf8StreamDecoder).
  virtual std::string decode(const std::vector<int32_t>& ids) const;
  // Writes dir/tokenizer.json atomically, creating dir if needed.
  virtual void save(const std::string& dir) const = 0;

 private:
  std::vector<int32_t> more_eos_;
};

// Byte-level: ids 0..255 are the bytes; 256 <bos>, 257 <eos>, 258 <pad>. Any byte string,
// valid UTF-8 or not, round-trips.
class ByteTokenizer : public Tokenizer {
 public:
  static constexpr int kBos = 256, kEos = 257, kPad = 258, kVocab = 259;
  std::string type() const override { return "byte"; }
  int vocab_size() const override { return kVocab; }
  int bos() const override { return kBos; }
  int eos() const override { return kEos; }
  int pad() const override { return kPad; }
  std::vector<int32_t> encode(std::string_view text, bool add_bos) const override;
  std::string decode_piece(int32_t id) const override;
  void save(const std::string& dir) const override;
};

// SentencePiece model (train_sentencepiece_bpe makes one): ids 0 <pad>, 1 <unk>, 2 <s> (bos),
// 3 </s> (eos), then the 256 byte pieces <0x00>..<0xFF>, then characters and merges. Encoding
// is byte-exact for valid UTF-8 (identity normalization, no dummy prefix, spaces kept), so
// decode(encode(t)) == t; characters not in the vocabulary fall back to their bytes. Caveats
// of SentencePiece itself: U+2581 in the text comes back as a space, and invalid UTF-8 is
// not preserved. decode_piece: the piece's bytes with U+2581 as ' ', <0xNN> as that one byte,
// "" for pad/bos/eos, U+FFFD for unk (only a model without byte fallback produces it).
// A model trained elsewhere (a Hugging Face folder's tokenizer.model: Llama 2 style) loads too;
// `ids` then overrides its bos/eos/pad (config.json's), and pad may be absent (-1). One with a
// dummy prefix (SentencePiece's "▁" before the text) decodes a whole sequence without that
// leading space, as SentencePiece and transformers do; decode_piece keeps it (mid-text view).
struct SpecialIds {
  int bos = -1, eos = -1, pad = -1;  // -1: the model's own
};
class SentencePieceTokenizer : public Tokenizer {
 public:
  // hm::Error naming the file when it is missing, unreadable or not a SentencePiece model.
  explicit SentencePieceTokenizer(const std::string& model_file, SpecialIds ids = {});
  ~SentencePieceTokenizer() override;
  SentencePieceTokenizer(const SentencePieceTokenizer&) = delete;
  SentencePieceTokenizer& operator=(const SentencePieceTokenizer&) = delete;

  std::string type() const override { return "sentencepiece"; }
  int vocab_size() const override { return static_cast<int>(pieces_.size()); }
  int bos() const override { return bos_; }
  int eos() const override { return eos_; }
  int pad() const override { return pad_; }
  std::vector<int32_t> encode(std::string_view text, bool add_bos) const override;
  std::string decode_piece(int32_t id) const override;
  std::string decode(const std::vector<int32_t>& ids) const override;
  // Writes dir/tokenizer.model, then dir/tokenizer.json ({"type": "sentencepiece", "model":
  // "tokenizer.model"}, and "bos"/"eos"/"pad" where they override the model's), each atomically.
  void save(const std::string& dir) const override;
  // The model as stored in tokenizer.model (a serialized ModelProto).
  const std::string& serialized_model() const { return model_; }
  // origin names the model in error messages.
  static std::unique_ptr<SentencePieceTokenizer> from_serialized(std::string model,
                                                                 const std::string& origin,
                                                                 SpecialIds ids = {});

 private:
  SentencePieceTokenizer() = default;
  void init(std::string model, const std::string& origin, SpecialIds ids);

  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  std::string model_;
  std::vector<std::string> pieces_;  // decode_piece of every id, computed once
  int bos_ = -1, eos_ = -1, pad_ = -1;
  SpecialIds overrides_;
  bool dummy_prefix_ = false;  // the model puts "▁" before the text
};

// A Hugging Face tokenizer.json with a BPE model (src/runtime/hf_tokenizer.cpp), run as the
// tokenizers library runs it:
//   added tokens   matched first, leftmost-longest; "normalized" ones after the normalizer;
//                  lstrip/rstrip/single_word are refused
//   normalizer     NFC, Prepend, Replace (string or regex), Sequence of them
//   pre_tokenizer  ByteLevel (GPT-2 split, prefix space), Split (string or regex: text_regex.h;
//                  every behavior, invert), Metaspace (prepend_scheme, split), Digits,
//                  Punctuation, Sequence of them
//   model          BPE: vocab, merges ("a b" or [a, b]), unk_token, fuse_unk, byte_fallback,
//                  ignore_merges (dropout and word prefixes/suffixes are refused)
//   post_processor ByteLevel, TemplateProcessing (its special tokens around one text), Sequence
//   decoder        ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace, Sequence of them
// Anything else (another model or component, truncation) is an hm::Error naming the field.
// Encoding equals the library's for valid UTF-8 text (Unicode tables: Unicode 14).
// encode(text, true) adds what the template adds (add_special_tokens=True in transformers), or
// bos where there is no template. decode(ids) is the library's decode(ids, skip_special_tokens=
// True) but keeps raw bytes where ByteLevel pieces do not form UTF-8. decode_piece(id) is the
// token as it reads inside a text: "" for special added tokens and for ids in the range that
// name no token (gaps, which the library skips too), byte pieces as their byte, and
// no stripping of a leading space (which decode does only at the start of a sequence).
// bos/eos/pad: the model folder's config.json bos_token_id/eos_token_id/pad_token_id when given
// (see load_tokenizer); else eos is the id of "<|endoftext|>" if it is an added token, bos the
// template's first token or eos, pad eos (-1 when none); encode with add_bos and no bos is an error.
class HfBpeTokenizer : public Tokenizer {
 public:
  // text: tokenizer.json's content; origin names it in errors.
  HfBpeTokenizer(std::string text, const std::string& origin, int bos = -1, int eos = -1, int pad = -1);
  ~HfBpeTokenizer() override;
  std::string type() const override { return "hf-bpe"; }
  int vocab_size() const override;
  int bos() const override { return bos_; }
  int eos() const override { return eos_; }
  int pad() const override { return pad_; }
  std::vector<int32_t> encode(std::string_view text, bool add_bos) const override;
  std::string decode_piece(int32_t id) const override;
  std::string decode(const std::vector<int32_t>& ids) const override;
  // Writes dir/tokenizer.json: the file as read, byte for byte.
  void save(const std::string& dir) const override;

  struct Impl;

 private:
  std::string text_;
  std::unique_ptr<Impl> impl_;
  int bos_ = -1, eos_ = -1, pad_ = -1;
};

// The GPT-2 pre-tokenizer split (ByteLevel with use_regex), by hand:
// 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// Returns the pieces of valid UTF-8 text, in order (their concatenation is text).
std::vector<std::string_view> gpt2_split(std::string_view text);
// The pieces that a tokenizer.json pre_tokenizer (its JSON text) cuts from valid UTF-8 text, as
// the tokenizers library's pre_tokenize_str gives them: what the fixture tests compare.
std::vector<std::string> hf_pre_tokenize(const std::string& pre_tokenizer_json, std::string_view text);

// Trains a byte-fallback BPE SentencePiece model on texts (each split into lines; empty lines
// skipped) and writes it with SentencePieceTokenizer::save to out_dir. Deterministic: the same
// texts and vocab_size give a byte-identical tokenizer.model (one thread, no sampling or
// shuffling of the input, fixed seed). vocab_size counts the 4 specials and 256 byte pieces,
// so it must exceed 260 plus the distinct characters kept (character_coverage 0.9995; rarer
// characters are left to the byte pieces). hm::Error for no text or a vocab_size the trainer
// rejects.
void train_sentencepiece_bpe(const std::vector<std::string>& texts, int vocab_size,
                             const std::string& out_dir);

// Reads dir/tokenizer.json (parse_json_file): {"type": "byte"}, or {"type": "sentencepiece",
// "model": FILE} with FILE inside dir (file_inside_dir; default "tokenizer.model"), or a Hugging
// Face tokenizer.json (one whose "model" is an object): HfBpeTokenizer, with bos/eos/pad from
// dir/config.json's *_token_id when that file has them. A Hugging Face folder (config.json)
// with tokenizer.model and no tokenizer.json: SentencePieceTokenizer with config.json's ids. A missing
// tokenizer.json is an error (for a task checkpoint, one naming its task), as are an unknown
// type or field, malformed JSON, a missing or corrupt model: hm::Error naming file and field.
// In a folder with config.json, eos_token_id given as a list there or in generation_config.json
// (an integer or a list) sets more_eos (and eos, when config.json's is a list: its first).
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& dir);

// Turns a token stream into text as it arrives. A UTF-8 character may span tokens: push()
// returns what is now complete, holding back an incomplete trailing sequence that could
// still become valid; flush() returns what is left. Output is always valid UTF-8: bytes
// that cannot be part of a valid character become U+FFFD (one per maximal ill-formed
// subpart, the Unicode-recommended practice), in push() as soon as they are known bad and
// in flush() for a sequence cut short. Keeps a reference: the tokenizer must outlive it.
class Utf8StreamDecoder {
 public:
  explicit Utf8StreamDecoder(const Tokenizer& tok) : tok_(tok) {}
  std::string push(int32_t id);
  std::string flush();

 private:
  const Tokenizer& tok_;
  std::string pending_;  // at most 3 bytes: the start of a character not yet complete
};

bool is_valid_utf8(std::string_view s);
// Offset of the first byte that does not start a well-formed character (a truncated one at the
// end counts), or std::string_view::npos when s is valid UTF-8.
size_t utf8_error_offset(std::string_view s);

}  // namespace hm
