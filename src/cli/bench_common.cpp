#include "cli/bench_common.h"

#include <algorithm>
#include <array>
#include <cstdio>
#include <fstream>

#include "core/error.h"

namespace hm::cli {

double median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const size_t h = v.size() / 2;
  return v.size() % 2 ? v[h] : 0.5 * (v[h - 1] + v[h]);
}

double forward_gemm_flops(const ModelConfig& c, const Params& p, double T, double rows) {
  double layer_params = 0;
  for (const auto& s : p.specs())
    if (s.shape.size() == 2 && s.name.find("embeddings") == std::string::npos && s.name != "lm_head.weight")
      layer_params += double(s.numel());
  return 2.0 * T * layer_params + 2.0 * rows * double(c.vocab_size) * c.d_model;
}

std::pair<int, std::string> run_capture_status(const std::string& cmd) {
  std::string out;
  FILE* p = popen(cmd.c_str(), "r");
  HM_CHECK(p != nullptr, "bench: cannot run '", cmd, "'");
  std::array<char, 4096> buf{};
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) out.append(buf.data(), n);
  return {pclose(p), out};
}

std::string run_capture(const std::string& cmd) {
  auto [rc, out] = run_capture_status(cmd);
  HM_CHECK(rc == 0, "bench: '", cmd, "' failed (status ", rc, ")");
  return out;
}

std::string cell(double v, const char* suffix) {
  if (!std::isfinite(v)) return "-";
  char buf[64];
  std::snprintf(buf, sizeof buf, std::fabs(v) >= 100 ? "%.1f%s" : std::fabs(v) >= 1 ? "%.2f%s" : "%.3g%s", v, suffix);
  return buf;
}

void print_rows(const std::vector<Row>& rows, FILE* out) {
  const std::vector<std::string> head = {"test", "ours", "unit", "floor", "of floor", "peer", "vs peer"};
  std::vector<std::vector<std::string>> cells;
  for (const Row& x : rows) {
    const double of_floor = x.rate ? x.ours / x.floor : x.floor / x.ours;
    const double vs_peer = x.rate ? x.ours / x.peer : x.peer / x.ours;
    cells.push_back({x.test, cell(x.ours), x.unit, cell(x.floor), cell(of_floor), cell(x.peer), cell(vs_peer, "x")});
  }
  std::vector<size_t> w(head.size());
  for (size_t j = 0; j < head.size(); ++j) {
    w[j] = head[j].size();
    for (const auto& row : cells) w[j] = std::max(w[j], row[j].size());
  }
  auto line = [&](const std::vector<std::string>& row) {
    std::string text = "|";
    for (size_t j = 0; j < row.size(); ++j) {
      const std::string pad(w[j] - row[j].size(), ' ');
      const bool left = j == 0 || j == 2;  // text left, numbers right
      text.append(" ").append(left ? row[j] : pad).append(left ? pad : row[j]).append(" |");
    }
    std::fprintf(out, "%s\n", text.c_str());
  };
  line(head);
  std::string rule = "|";
  for (size_t j = 0; j < head.size(); ++j) {
    const bool left = j == 0 || j == 2;  // numbers get a right-aligned rule, "--:"
    rule.append(" ").append(w[j] - (left ? 0 : 1), '-').append(left ? "" : ":").append(" |");
  }
  std::fprintf(out, "%s\n", rule.c_str());
  for (const auto& row : cells) line(row);
}


std::string cpuinfo_value(const std::string& key) {
  std::ifstream f("/proc/cpuinfo");
  for (std::string line; std::getline(f, line);) {
    const size_t colon = line.find(':');
    if (line.rfind(key, 0) != 0 || colon == std::string::npos) continue;
    const size_t name_end = line.find_last_not_of(" \t", colon - 1);
    if (name_end + 1 != key.size()) continue;  // "flags" is not "vmx flags"
    std::string v = line.substr(colon + 1);
    return v.substr(std::min(v.size(), v.find_first_not_of(' ')));
  }
  return "unknown";
}

}  // namespace hm::cli
