// Hugging Face chat templates: a Jinja interpreter for the subset that chat templates use, with
// the environment transformers renders them in (trim_blocks, lstrip_blocks, loop controls, its
// own tojson, raise_exception and strftime_now), and the reader of a model folder's template.
//
// Supported: {{ }}, {% %}, {# #}, whitespace control (- and +), raw; if/elif/else, for (tuple
// targets, `if` filter, else, loop.*, break/continue), set (names, tuples, ns.attr, block set),
// macro, filter blocks, generation (a no-op, as transformers' AssistantTracker renders it);
// Python-like values (none/bool/int/float/str/list/dict, namespace, markupsafe's Markup) with
// jinja2's default Undefined (printing, testing and iterating one is fine; its attributes and
// arithmetic are errors, as in jinja2); the filters, tests, globals and str/dict methods listed
// in chat_template.cpp. Not supported, each an hm::Error naming the template line: call blocks,
// include/extends/import/block/with/do, recursive loops, *args, printf-style % and str.format,
// dict literals with non-string keys; integers are 64-bit (overflow is an error) and upper/lower
// map ASCII, Latin-1, Latin Extended-A, Greek and Cyrillic only. Nothing crashes or hangs:
// parsing and rendering are bounded in nesting depth, steps and output size.
#pragma once
#include <cstddef>
#include <cstdint>
#include <ctime>
#include <functional>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

namespace hm {

struct ChatTemplateLimits {
  size_t max_output = size_t(16) << 20;  // bytes of output, and of any one string or list built
  int max_depth = 128;                   // nesting of blocks and expressions; macro calls a quarter of it,
                                         // eval and exec calls 4x it (the C++ stack, ASan included)
  uint64_t max_steps = 20'000'000;       // evaluation steps of one render
};

class ChatTemplate {
 public:
  // Parses `source` (hm::Error "chat template line N: ..." when it is not valid).
  explicit ChatTemplate(const std::string& source, ChatTemplateLimits limits = {});
  ~ChatTemplate();
  ChatTemplate(const ChatTemplate&) = delete;
  ChatTemplate& operator=(const ChatTemplate&) = delete;

  // Renders with `vars` (an object: messages, add_generation_prompt, bos_token, ...) as the
  // template's variables; key order is kept, as Python's dicts keep it.
  std::string render(const nlohmann::ordered_json& vars) const;
  std::string render(const nlohmann::json& vars) const;

  // The clock of strftime_now (default: the local time now); tests fix it.
  void set_clock(std::function<std::tm()> now);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// A model folder's chat template and the special tokens it is rendered with.
struct HfChatTemplate {
  std::string source;         // the Jinja text ("" when the folder has none)
  std::string origin;         // the file it came from
  nlohmann::json special_tokens = nlohmann::json::object();  // bos_token, eos_token, ...
  bool empty() const { return source.empty(); }
};

// Reads the template of a Hugging Face folder as transformers does: chat_template.jinja, else
// chat_template.json's "chat_template", else tokenizer_config.json's "chat_template" (a string,
// or a list of {name, template}: "tool_use" when `with_tools` and there is one, else "default").
// Special tokens (bos_token, eos_token, unk_token, pad_token, ...) come from tokenizer_config.json
// as strings or {"content": ...}. An empty result when the folder has no template; hm::Error
// when the files are malformed.
HfChatTemplate read_chat_template(const std::string& model_dir, bool with_tools = false);

// Copies a model folder's chat template files (chat_template.jinja, chat_template.json,
// tokenizer_config.json) and generation_config.json (its stop tokens), those present, into
// out_dir, so that a checkpoint written from it (hm convert, hm quantize, hm train --init-from)
// renders chats and stops as the original does. Returns the number copied.
int copy_chat_template_files(const std::string& from_dir, const std::string& out_dir);

// A compiled folder template: renders `messages` as transformers' apply_chat_template(messages,
// tokenize=False, add_generation_prompt=...) would (tools and documents None unless given).
class ChatFormat {
 public:
  explicit ChatFormat(HfChatTemplate t, ChatTemplateLimits limits = {});
  std::string apply(const nlohmann::json& messages, bool add_generation_prompt = true,
                    const nlohmann::json& tools = nullptr) const;
  // The same with every object's keys in the order given (a request as its client wrote it):
  // transformers' tojson prints a message's keys, and a tool call's arguments, in that order.
  std::string apply(const nlohmann::ordered_json& messages, bool add_generation_prompt = true,
                    const nlohmann::ordered_json& tools = nullptr) const;
  const HfChatTemplate& info() const { return info_; }
  ChatTemplate& compiled() { return tmpl_; }

 private:
  HfChatTemplate info_;
  ChatTemplate tmpl_;
};

}  // namespace hm
