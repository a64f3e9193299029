// hm chat: an interactive chat on the terminal. Each line read is a user message; the
// conversation is rendered with the model folder's chat template (runtime/chat_template.h; the
// server's <|role|> format when the folder has none), and the model reads only what is new since
// its last turn: one sequence's state stays in HybridMemory between turns. When the template's
// rendering does not extend what the model has read (a template that rewrites earlier turns,
// e.g. one that trims the reply or drops reasoning), the conversation is read again from the
// start, and stderr says so.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <iostream>
#include <memory>
#include <string>

#include "cli/commands.h"
#include "cli/device.h"
#include "cli/memory_guard.h"
#include "core/error.h"
#include "core/threads.h"
#include "model/model.h"
#include "runtime/chat_template.h"
#include "runtime/memory.h"
#include "runtime/sampling.h"
#include "runtime/tokenizer.h"
#include "server/api.h"

namespace hm::cli {

namespace {

struct ChatOpts {
  std::string model, system;
  int max_new = 256, threads = 0, ctx = 4096, prefill_chunk = 512;
  bool stats = false, reread = false;
  DeviceOptions dev;
  std::string weights = "auto";
  SamplingParams sp;
};

class Session {
 public:
  Session(const ChatOpts& o, HybridModel& model, const Tokenizer& tok, HybridMemory& mem, const ChatFormat* chat)
      : o_(o), model_(model), tok_(tok), mem_(mem), chat_(chat) {
    reset();
  }

  void reset() {
    messages_ = nlohmann::json::array();
    if (!o_.system.empty()) messages_.push_back({{"role", "system"}, {"content", o_.system}});
    mem_.seq_rm(0);
    read_.clear();
    sampler_ = make_sampler_chain(o_.sp, tok_.vocab_size());
    turn_ = 0;
  }

  // One turn: the user's line in, the reply streamed to stdout.
  void turn(const std::string& line) {
    ++turn_;
    messages_.push_back({{"role", "user"}, {"content", line}});
    const std::string text = chat_ ? chat_->apply(messages_, true) : server::apply_chat_template(messages_);
    std::vector<int32_t> toks;
    const bool extends = !o_.reread && text.compare(0, read_.size(), read_) == 0;
    if (extends && !read_.empty()) {
      toks = tok_.encode(std::string_view(text).substr(read_.size()), false);
    } else {
      if (!read_.empty() && !o_.reread)
        std::fprintf(stderr,
                     "hm chat: the template renders the earlier turns differently from what the model has read; "
                     "reading the whole conversation again\n");
      mem_.seq_rm(0);
      sampler_->reset();
      // The template writes its own bos; the default format does not.
      toks = tok_.encode(text, chat_ == nullptr && tok_.bos() >= 0);
    }
    read_ = text;
    const int ctx = mem_.max_ctx();
    HM_CHECK(mem_.pos(0) + int64_t(toks.size()) < ctx, "the conversation needs ", mem_.pos(0) + int64_t(toks.size()),
             " tokens and the context holds ", ctx, ": start again (/reset) or give a larger --ctx");
    const int held = mem_.pos(0);
    feed(toks);
    const int V = model_.config().vocab_size;
    std::vector<int32_t> reply;
    Utf8StreamDecoder dec(tok_);
    while (int(reply.size()) < o_.max_new && mem_.pos(0) < ctx) {
      const int32_t t = sampler_->sample(logits_.data(), V);
      if (tok_.is_eos(t)) break;
      sampler_->accept(t);
      reply.push_back(t);
      std::fputs(dec.push(t).c_str(), stdout);
      std::fflush(stdout);
      feed({t});
    }
    std::fputs(dec.flush().c_str(), stdout);
    std::fputs("\n", stdout);
    std::fflush(stdout);
    const std::string reply_text = tok_.decode(reply);
    read_ += reply_text;
    messages_.push_back({{"role", "assistant"}, {"content", reply_text}});
    if (o_.stats)
      std::fprintf(stderr, "hm chat: turn %d: %zu new prompt tokens (%d already held), %zu generated, %d in the state\n",
                   turn_, toks.size(), held, reply.size(), mem_.pos(0));
  }

 private:
  const ChatOpts& o_;
  HybridModel& model_;
  const Tokenizer& tok_;
  HybridMemory& mem_;
  const ChatFormat* chat_;
  nlohmann::json messages_;
  std::string read_;  // the text whose tokens the state holds
  std::unique_ptr<SamplerChain> sampler_;
  std::vector<float> logits_;
  int turn_ = 0;

  // Runs toks through the model (sequence 0), leaving the last token's logits in logits_.
  void feed(const std::vector<int32_t>& toks) {
    for (size_t k = 0; k < toks.size(); k += size_t(o_.prefill_chunk)) {
      const size_t n = std::min(toks.size() - k, size_t(o_.prefill_chunk));
      Batch b;
      b.add(0, std::vector<int32_t>(toks.begin() + long(k), toks.begin() + long(k + n)));
      model_.forward(b, mem_, logits_);
    }
    for (int32_t t : toks) sampler_->accept(t);
  }
};

}  // namespace

Run add_chat(CLI::App& app) {
  auto o = std::make_shared<ChatOpts>();
  app.add_option("--model,-m", o->model, "Checkpoint directory, a training run's folder, or a Hugging Face folder")
      ->required();
  app.add_option("--system", o->system, "A system message to start the conversation with");
  app.add_option("--max-new-tokens,-n", o->max_new, "Tokens per reply at most")->capture_default_str()
      ->check(CLI::Range(1, 1 << 20));
  app.add_option("--ctx", o->ctx, "Tokens the whole conversation may hold")->capture_default_str()
      ->check(CLI::Range(2, 1 << 24));
  add_sampling_options(app, o->sp);
  app.add_option("--threads,-t", o->threads, "Threads (0 = all cores)")->capture_default_str()->check(non_negative());
  app.add_flag("--stats", o->stats, "Per turn on stderr: the prompt tokens read, the tokens generated");
  app.add_flag("--reread", o->reread,
               "Read the whole conversation again every turn instead of keeping the model's state (for comparison)");
  add_device_options(app, o->dev, true);
  add_weights_option(app, o->weights);
  add_max_memory(app);
  app.footer("Each line of standard input is a user message; the reply follows on standard output. /reset starts a "
             "new conversation, /exit (or end of input) ends. The conversation is rendered with the folder's chat "
             "template (chat_template.jinja, chat_template.json or tokenizer_config.json), else hm serve's "
             "<|role|> format.");
  return [o, &app] {
    finish_sampling_options(app, o->sp);
    validate(o->sp);
    DeviceSetup dev = open_device(o->dev);
    if (o->threads > 0) set_num_threads(o->threads);
    check_model_memory(o->model, inference_shape(1, o->ctx, dev.kv_name()), "hm chat");
    auto model = load_model_on(o->model, *dev.be, dev.dtype, o->weights);
    auto tok = load_tokenizer(o->model);
    std::unique_ptr<ChatFormat> chat;
    HfChatTemplate t = read_chat_template(o->model);
    if (!t.empty()) chat = std::make_unique<ChatFormat>(t);
    std::fprintf(stderr, "hm chat: chat template: %s\n",
                 chat ? chat->info().origin.c_str() : "none in the folder, hm serve's <|role|> format");
    HybridMemory mem(*dev.be, model->config(), 1, o->ctx, dev.kv);
    Session s(*o, *model, *tok, mem, chat.get());
    const bool tty = isatty(STDIN_FILENO) != 0;
    std::string line;
    for (;;) {
      if (tty) std::fputs("> ", stderr);
      if (!std::getline(std::cin, line)) break;
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.empty()) continue;
      if (line == "/exit" || line == "/quit") break;
      if (line == "/reset") {
        s.reset();
        std::fprintf(stderr, "hm chat: a new conversation\n");
        continue;
      }
      HM_CHECK(is_valid_utf8(line), "the line is not valid UTF-8");
      s.turn(line);
    }
    return 0;
  };
}

}  // namespace hm::cli
