// Text formatting shared by the progress lines of hm train and hm compare.
#pragma once
#include <cmath>
#include <cstdio>
#include <string>

namespace hm {

// A duration for a progress line: "42s", "3m05s", "1h02m"; "?" when unknown (negative or not finite).
inline std::string fmt_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const long long t = static_cast<long long>(s + 0.5);
  char buf[32];
  if (t >= 3600) std::snprintf(buf, sizeof buf, "%lldh%02lldm", t / 3600, (t / 60) % 60);
  else if (t >= 60) std::snprintf(buf, sizeof buf, "%lldm%02llds", t / 60, t % 60);
  else std::snprintf(buf, sizeof buf, "%llds", t);
  return buf;
}

}  // namespace hm
