// hm: define, inspect, run and measure hybrid Mamba-attention models.
#include <cstdio>
#include <map>
#include <string>

#include "cli/commands.h"
#include "core/error.h"
#include "core/interrupt.h"

int main(int argc, char** argv) {
  CLI::App app{"hm: hybrid Mamba + attention language models (init, train, eval, generate, chat, bench, route, compare, info, convert, quantize)"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "hybrid-mamba 0.1.0");
  std::map<CLI::App*, hm::cli::Run> runs;
  auto add = [&](const char* name, const char* help, hm::cli::Run (*reg)(CLI::App&)) {
    CLI::App* sub = app.add_subcommand(name, help);
    runs[sub] = reg(*sub);
  };
  add("init", "Write a new model with documented random initialization", hm::cli::add_init);
  add("train", "Train a model on a text corpus, with checkpoints and exact resume", hm::cli::add_train);
  add("eval", "Validation loss and perplexity of a model on a corpus's validation split", hm::cli::add_eval);
  add("generate", "Generate text from a prompt, streaming tokens as they are made", hm::cli::add_generate);
  add("bench", "Measure prefill, decode, memory and the PyTorch peer in one run", hm::cli::add_bench);
  add("route", "Show how a true-hybrid model routes a prompt: path usage per layer and a heatmap",
      hm::cli::add_route);
  add("compare", "Train every architecture on a task at matched size and budget; table and plot",
      hm::cli::add_compare);
  add("info", "Print a model's configuration and parameter count", hm::cli::add_info);
  add("serve", "Serve a model over an OpenAI-compatible HTTP API (docs/SERVER.md)", hm::cli::add_serve);
  add("chat", "Chat with a model on the terminal, with its chat template, keeping its state between turns",
      hm::cli::add_chat);
  add("convert", "Write our checkpoint from a Hugging Face model folder (docs/MODELS.md)", hm::cli::add_convert);
  add("quantize", "Write a checkpoint with its linear weights packed as q8_0, q4_0, bf16 or f16 (docs/QUANTIZATION.md)",
      hm::cli::add_quantize);
  hm::cli::set_command_line(argc, argv);
  // Every --model may name a training run's folder: it stands for that run's checkpoint/.
  for (auto& [sub, run] : runs)
    if (CLI::Option* m = sub->get_option_no_throw("--model")) m->transform(hm::cli::resolve_model_dir);
  // A word that is no subcommand would otherwise read "A subcommand is required".
  if (argc > 1 && argv[1][0] != '-') {
    std::string names;
    bool known = false;
    for (const CLI::App* sub : app.get_subcommands([](const CLI::App*) { return true; })) {
      names += (names.empty() ? "" : ", ") + sub->get_name();
      known = known || sub->get_name() == argv[1];
    }
    if (!known) {
      std::fprintf(stderr, "hm: unknown command '%s'; the commands are: %s (hm --help)\n", argv[1], names.c_str());
      return 2;
    }
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // Usage errors exit with 2, as most command-line tools do; --help and --version with 0.
    return app.exit(e) == 0 ? 0 : 2;
  }
  try {
    for (auto& [sub, run] : runs)
      if (sub->parsed()) return run();
  } catch (const hm::Interrupted& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "hm: %s\n", e.what());
    return e.exit_code();
  } catch (const hm::Error& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "hm: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "hm: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
