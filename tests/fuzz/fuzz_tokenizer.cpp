// Fuzz target: a tokenizer directory through load_tokenizer, then encoding and decoding of
// arbitrary bytes. The input is up to three parts split by hm::fuzz::kSplit: tokenizer.json,
// tokenizer.model, the text (a missing part is a missing file; an empty first part means no
// tokenizer.json, i.e. byte-level). Bad files must end in hm::Error; a tokenizer that loads
// must give ids in its vocabulary, decode every one of them and stream valid UTF-8.
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>

#include "core/error.h"
#include "fuzz_util.h"
#include "runtime/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace fs = std::filesystem;
  const fs::path& dir = hm::fuzz::scratch_dir();
  const auto parts = hm::fuzz::split_input(data, size);
  fs::remove(dir / "tokenizer.json");
  fs::remove(dir / "tokenizer.model");
  if (!parts[0].empty()) hm::fuzz::write_file(dir / "tokenizer.json", parts[0]);
  if (parts.size() > 1) hm::fuzz::write_file(dir / "tokenizer.model", parts[1]);
  const std::string_view text = parts.size() > 2 ? parts[2] : std::string_view("Hello, world.\n");

  std::unique_ptr<hm::Tokenizer> tok;
  try {
    tok = hm::load_tokenizer(dir.string());
  } catch (const hm::Error&) {
    return 0;
  }
  const int vocab = tok->vocab_size();
  HM_FUZZ_REQUIRE(vocab > 0);
  // -1: none (a tokenizer.json without config.json may name no eos).
  for (int id : {tok->bos(), tok->eos(), tok->pad()}) HM_FUZZ_REQUIRE(id >= -1 && id < vocab);
  for (bool bos : {false, true}) {
    if (bos && tok->bos() < 0) continue;  // encode refuses with an hm::Error
    std::vector<int32_t> ids;
    try {
      ids = tok->encode(text, bos);
    } catch (const hm::Error&) {  // text that is not UTF-8 for a Hugging Face tokenizer
      continue;
    }
    for (int32_t id : ids) HM_FUZZ_REQUIRE(id >= 0 && id < vocab);
    const std::string back = tok->decode(ids);
    if (tok->type() == "byte") HM_FUZZ_REQUIRE(back == text);
    hm::Utf8StreamDecoder stream(*tok);
    std::string out;
    for (int32_t id : ids) out += stream.push(id);
    out += stream.flush();
    HM_FUZZ_REQUIRE(hm::is_valid_utf8(out));
  }
  // Every id decodes; one past the end is an hm::Error.
  for (int id = 0; id < vocab; ++id) (void)tok->decode_piece(id);
  bool refused = false;
  try {
    (void)tok->decode_piece(vocab);
  } catch (const hm::Error&) {
    refused = true;
  }
  HM_FUZZ_REQUIRE(refused);
  return 0;
}
