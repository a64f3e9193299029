// Tokenizers and streaming UTF-8 output. A model directory names its tokenizer in
// tokenizer.json; without one the model is byte-level.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace hm {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual std::string type() const = 0;
  virtual int vocab_size() const = 0;  // ids this tokenizer can produce and decode
  virtual int bos() const = 0;
  virtual int eos() const = 0;
  virtual int pad() const = 0;
  virtual std::vector<int32_t> encode(std::string_view text, bool add_bos) const = 0;
  // Raw bytes of one token ("" for specials); hm::Error for an id out of range.
  virtual std::string decode_piece(int32_t id) const = 0;
  // Concatenated pieces: raw bytes, not necessarily valid UTF-8 (see Utf8StreamDecoder).
  std::string decode(const std::vector<int32_t>& ids) const;
  // Writes dir/tokenizer.json atomically, creating dir if needed.
  virtual void save(const std::string& dir) const = 0;
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

// Reads dir/tokenizer.json ({"type": "byte"}); a missing file means byte-level. Unknown
// type or malformed JSON -> hm::Error naming the file and field.
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

}  // namespace hm
