#include <cstdio>
#include <memory>

#include "backend/backend.h"
#include "cli/commands.h"
#include "cli/device.h"
#include "cli/memory_guard.h"
#include "core/error.h"
#include "io/hf_model.h"
#include "core/threads.h"
#include "model/model.h"
#include "runtime/generate.h"
#include "runtime/tokenizer.h"

namespace hm::cli {

Run add_generate(CLI::App& app) {
  struct Opts {
    std::string model;
    std::vector<std::string> prompts, prompt_files;
    int max_new = 64, threads = 0, ctx = 0;
    bool no_bos = false, stats = false;
    DeviceOptions dev;
    std::string weights = "auto";
    SamplingParams sp;
  };
  auto o = std::make_shared<Opts>();
  app.add_option("--model,-m", o->model, "Checkpoint directory, or a training run's folder")->required();
  app.add_option("--prompt,-p", o->prompts, "Prompt text (- reads standard input); repeat for a batch of prompts");
  app.add_option("--prompt-file,-f", o->prompt_files, "A file whose text is a prompt; repeat for a batch")
      ->check(CLI::ExistingFile);
  app.add_option("--max-new-tokens,-n", o->max_new, "Tokens to generate per prompt")
      ->capture_default_str()->check(non_negative());
  add_sampling_options(app, o->sp);
  app.add_option("--threads,-t", o->threads, "Threads (0 = all cores)")->capture_default_str()->check(non_negative());
  app.add_option("--ctx", o->ctx, "Context size (0 = prompt + new tokens)")->capture_default_str()->check(non_negative());
  add_device_options(app, o->dev, true);
  add_weights_option(app, o->weights);
  app.add_flag("--no-bos", o->no_bos, "Do not prepend the BOS token");
  app.add_flag("--stats", o->stats, "Print timing to stderr at the end");
  app.footer("Prompts given with --prompt come first, then those of --prompt-file; -f FILE and -p - (standard "
             "input) drop one trailing newline.");
  add_max_memory(app);
  return [o, &app] {
    // Every setting is checked before anything is loaded or printed.
    HM_CHECK(!o->prompts.empty() || !o->prompt_files.empty(), "give a prompt: --prompt TEXT, --prompt - (standard "
             "input) or --prompt-file FILE");
    finish_sampling_options(app, o->sp);
    validate(o->sp);
    DeviceSetup dev = open_device(o->dev);
    if (o->threads > 0) set_num_threads(o->threads);
    std::vector<std::string> texts;
    for (const auto& p : o->prompts) texts.push_back(prompt_text(p));
    for (const auto& f : o->prompt_files) texts.push_back(prompt_file_text(f));
    check_model_memory(o->model,
                       inference_shape(int64_t(texts.size()),
                                       o->ctx > 0 ? o->ctx : max_prompt_tokens(texts) + o->max_new, dev.kv_name()),
                       "hm generate");
    auto model = load_model_on(o->model, *dev.be, dev.dtype, o->weights);
    auto tok = load_tokenizer(o->model);
    std::vector<std::vector<int32_t>> prompts;
    for (size_t i = 0; i < texts.size(); ++i) {
      HM_CHECK(is_valid_utf8(texts[i]), "prompt ", i, " is not valid UTF-8");
      prompts.push_back(tok->encode(texts[i], !o->no_bos));
      HM_CHECK(!prompts.back().empty(), "prompt ", i, " is empty (and --no-bos leaves no token)");
    }
    size_t longest = 0;
    for (const auto& p : prompts) longest = std::max(longest, p.size());
    warn_if_past_trained_context(o->model, int64_t(longest));
    const int ctx = o->ctx > 0 ? o->ctx : int(longest) + o->max_new;
    HybridMemory mem(*dev.be, model->config(), int(prompts.size()), ctx, dev.kv);
    GenerateOptions opt;
    opt.max_new_tokens = o->max_new;
    opt.sampling = o->sp;
    opt.n_decodable = tok->vocab_size();
    opt.eos = tok->eos();
    opt.more_eos = tok->more_eos();
    // One prompt streams to stdout as tokens arrive; a batch prints each result when done.
    const bool stream = prompts.size() == 1;
    std::vector<Utf8StreamDecoder> dec;
    for (size_t i = 0; i < prompts.size(); ++i) dec.emplace_back(*tok);
    if (stream) {
      std::fputs(texts[0].c_str(), stdout);
      std::fflush(stdout);
    }
    GenerateStats st;
    auto out = generate(*model, mem, prompts, opt,
                        [&](int seq, int32_t t) {
                          if (stream) {
                            std::fputs(dec[size_t(seq)].push(t).c_str(), stdout);
                            std::fflush(stdout);
                          }
                          return true;
                        },
                        &st);
    if (stream) {
      std::fputs(dec[0].flush().c_str(), stdout);
      std::fputs("\n", stdout);
    } else {
      for (size_t i = 0; i < out.size(); ++i)
        std::printf("[%zu] %s%s\n", i, texts[i].c_str(), tok->decode(out[i]).c_str());
    }
    if (o->stats)
      std::fprintf(stderr, "prefill: %lld tokens in %.1f ms | decode: %lld tokens in %.1f ms (%.1f tok/s)\n",
                   static_cast<long long>(st.prompt_tokens), st.prefill_ms,
                   static_cast<long long>(st.decoded_tokens), st.decode_ms,
                   st.decode_ms > 0 ? 1000.0 * double(st.decoded_tokens) / st.decode_ms : 0.0);
    return 0;
  };
}

}  // namespace hm::cli
