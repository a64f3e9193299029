// Helpers every subcommand shares (commands.h).
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "runtime/sampling.h"
#include "core/error.h"
#include "train/trainer.h"

namespace hm::cli {
namespace {

std::vector<std::string> g_args;

std::string drop_trailing_newline(std::string s) {
  if (!s.empty() && s.back() == '\n') s.pop_back();
  if (!s.empty() && s.back() == '\r') s.pop_back();
  return s;
}

}  // namespace

// Safe to paste into a POSIX shell: plain words as they are, the rest in single quotes.
std::string shell_quote(const std::string& a) {
  const bool plain = !a.empty() && a.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                                       "0123456789_./=:,+-@%") == std::string::npos;
  if (plain) return a;
  std::string q = "'";
  for (char ch : a) q += ch == '\'' ? std::string("'\\''") : std::string(1, ch);
  return q + "'";
}

void add_sampling_options(CLI::App& app, SamplingParams& sp) {
  app.add_option("--temperature", sp.temperature,
                 "0 = greedy, with the repeat penalty off unless --repeat-penalty is given")->capture_default_str();
  app.add_option("--top-k", sp.top_k, "0 = off")->capture_default_str()->check(non_negative());
  app.add_option("--top-p", sp.top_p, "1 = off")->capture_default_str();
  app.add_option("--min-p", sp.min_p, "0 = off")->capture_default_str();
  app.add_option("--repeat-penalty", sp.repeat_penalty, "1 = off")->capture_default_str();
  app.add_option("--repeat-last-n", sp.repeat_last_n, "Tokens the penalty looks back over")
      ->capture_default_str()->check(non_negative());
  app.add_option("--seed,-s", sp.seed, "Sampling seed")->capture_default_str();
}

void finish_sampling_options(const CLI::App& app, SamplingParams& sp) {
  if (sp.temperature == 0 && app.count("--repeat-penalty") == 0) sp.repeat_penalty = 1.0f;  // plain greedy
}

CLI::Validator non_negative() {
  return CLI::Validator(
      [](std::string& v) -> std::string {
        double x = 0;
        if (!CLI::detail::lexical_cast(v, x)) return "not a number: " + v;
        return x >= 0 ? std::string() : "must be 0 or more (got " + v + ")";
      },
      "NONNEGATIVE");
}

void set_command_line(int argc, char** argv) { g_args.assign(argv, argv + argc); }

std::string command_line() {
  std::string s;
  for (const auto& a : g_args) s += (s.empty() ? "" : " ") + shell_quote(a);
  return s;
}

std::string program_name() { return g_args.empty() ? std::string("hm") : shell_quote(g_args[0]); }

std::string resolve_model_dir(const std::string& dir) { return checkpoint_dir(dir); }

std::string prompt_file_text(const std::string& path) {
  HM_CHECK(!std::filesystem::is_directory(path), "--prompt-file ", path, ": is a folder, not a file");
  std::ifstream f(path, std::ios::binary);
  HM_CHECK(f.good(), "--prompt-file ", path, ": cannot open the file");
  std::ostringstream s;
  s << f.rdbuf();
  HM_CHECK(!f.bad(), "--prompt-file ", path, ": read error");
  return drop_trailing_newline(s.str());
}

std::string prompt_text(const std::string& arg) {
  if (arg != "-") return arg;
  std::string s((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
  return drop_trailing_newline(std::move(s));
}

void warn_if_past_trained_context(const std::string& dir, int64_t n_tokens) {
  const int64_t trained = trained_seq_len(dir);
  if (trained > 0 && n_tokens > trained)
    std::fprintf(stderr,
                 "warning: the prompt is %lld tokens, longer than the %lld-token sequences the model was trained "
                 "on (%s/trainer_state.json); expect worse text past that point\n",
                 static_cast<long long>(n_tokens), static_cast<long long>(trained), dir.c_str());
}

}  // namespace hm::cli
