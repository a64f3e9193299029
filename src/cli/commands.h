// The hm command's subcommands. Each registers its options on a CLI11 app and returns the
// function that runs it; main() turns hm::Error into a one-line message and exit code 1.
#pragma once
#include <cstdint>
#include <functional>
#include <string>

#include <CLI/CLI.hpp>

namespace hm {
struct SamplingParams;
}

namespace hm::cli {

using Run = std::function<int()>;

// Shared by the subcommands (common.cpp).
// For counts and sizes: "--top-k: must be 0 or more (got -3)" (CLI11's NonNegativeNumber names
// the largest double as its bound).
CLI::Validator non_negative();
// --temperature, --top-k, --top-p, --min-p, --repeat-penalty, --repeat-last-n, --seed into sp
// (hm generate, hm chat). Call finish_sampling_options when the command runs: --temperature 0
// without --repeat-penalty is plain greedy (the penalty off).
void add_sampling_options(CLI::App& app, SamplingParams& sp);
void finish_sampling_options(const CLI::App& app, SamplingParams& sp);
// The command line as typed, quoted for a shell; argv[0] as typed (e.g. build/hm).
void set_command_line(int argc, char** argv);
std::string command_line();
std::string program_name();
std::string shell_quote(const std::string& arg);
// The model directory --model names: a training run's folder resolves to its checkpoint/.
// main() applies it to every subcommand's --model.
std::string resolve_model_dir(const std::string& dir);
// A prompt's text: --prompt ARG ("-" reads standard input) or --prompt-file PATH. One trailing
// newline of a file or of stdin is dropped (editors and echo add it).
std::string prompt_text(const std::string& arg);
std::string prompt_file_text(const std::string& path);
// A warning on stderr when a prompt of n tokens is longer than the context the model in `dir`
// was trained at (its trainer_state.json); silent when that is unknown.
void warn_if_past_trained_context(const std::string& dir, int64_t n_tokens);
Run add_init(CLI::App& app);
Run add_generate(CLI::App& app);
Run add_bench(CLI::App& app);
Run add_info(CLI::App& app);
Run add_convert(CLI::App& app);
Run add_train(CLI::App& app);
Run add_eval(CLI::App& app);
Run add_route(CLI::App& app);
Run add_compare(CLI::App& app);
Run add_serve(CLI::App& app);
Run add_chat(CLI::App& app);
Run add_quantize(CLI::App& app);

}  // namespace hm::cli
