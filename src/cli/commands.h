// The hm command's subcommands. Each registers its options on a CLI11 app and returns the
// function that runs it; main() turns hm::Error into a one-line message and exit code 1.
#pragma once
#include <functional>

#include <CLI/CLI.hpp>

namespace hm::cli {

using Run = std::function<int()>;
Run add_init(CLI::App& app);
Run add_generate(CLI::App& app);
Run add_bench(CLI::App& app);
Run add_info(CLI::App& app);
Run add_train(CLI::App& app);
Run add_eval(CLI::App& app);
Run add_route(CLI::App& app);
Run add_compare(CLI::App& app);

}  // namespace hm::cli
