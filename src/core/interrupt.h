// Ctrl-C and SIGTERM as a request to stop at the next safe point, so long jobs (hm train,
// hm compare) finish their step, save a checkpoint and exit instead of losing their work.
// The signal handler only records the signal; the work loops poll interrupt_signal().
#pragma once
#include <string>

#include "core/error.h"

namespace hm {

// While one exists, SIGINT and SIGTERM set the flag instead of ending the process. Each
// handler is installed with SA_RESETHAND: a second Ctrl-C gets the default action and ends
// the process at once. The destructor puts the previous handlers back.
class InterruptScope {
 public:
  InterruptScope();
  ~InterruptScope();
  InterruptScope(const InterruptScope&) = delete;
  InterruptScope& operator=(const InterruptScope&) = delete;
};

// 0, or the first signal received since the last clear_interrupt().
int interrupt_signal();
void clear_interrupt();
// As if `sig` had arrived (tests, and callers that stop for their own reasons).
void request_interrupt(int sig);

// "SIGINT", "SIGTERM", else "signal N".
std::string signal_name(int sig);

// Thrown by a loop that stopped for a signal after saving its work; the CLI exits with
// 128 + signal, as a shell reports a process that the signal ended.
class Interrupted : public Error {
 public:
  Interrupted(int sig, const std::string& what) : Error(what), sig_(sig) {}
  int signal() const { return sig_; }
  int exit_code() const { return 128 + sig_; }

 private:
  int sig_;
};

}  // namespace hm
