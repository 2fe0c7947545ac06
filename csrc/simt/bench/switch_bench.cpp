// Fiber switch cost of the three backends of fiber.h: a scheduler resumes one fiber that yields
// straight back, N times; a round trip is two switches. Also the emulator's pattern: 256 fibers
// resumed in turn (cache effects of many stacks). Prints ns per switch.
#include <chrono>
#include <cstdio>
#include <memory>
#include <vector>

#include "simt/fiber.h"

namespace {

template <typename Fiber>
struct Bench {
  static inline std::vector<std::unique_ptr<Fiber>>* fibers = nullptr;
  static inline long rounds = 0;
  static void body(void* arg) {
    auto* f = static_cast<Fiber*>(arg);
    for (long i = 0; i < rounds; ++i) f->yield();
  }
  static double run(int nfibers, long n) {
    std::vector<std::unique_ptr<Fiber>> fs;
    for (int i = 0; i < nfibers; ++i) fs.push_back(std::make_unique<Fiber>(64 * 1024));
    rounds = n;
    for (auto& f : fs) f->start(&body, f.get());
    const auto t0 = std::chrono::steady_clock::now();
    for (long i = 0; i < n; ++i) {
      for (auto& f : fs) f->resume();
    }
    const auto t1 = std::chrono::steady_clock::now();
    for (auto& f : fs) f->resume();  // let them finish
    const double ns = std::chrono::duration<double, std::nano>(t1 - t0).count();
    return ns / (2.0 * static_cast<double>(n) * nfibers);
  }
};

template <typename Fiber>
void report(const char* name) {
  Bench<Fiber>::run(1, 100000);  // warm-up
  double best1 = 1e30, best256 = 1e30;
  for (int rep = 0; rep < 5; ++rep) {
    best1 = std::min(best1, Bench<Fiber>::run(1, 2000000));
    best256 = std::min(best256, Bench<Fiber>::run(256, 8000));
  }
  std::printf("%-16s %8.1f ns/switch (1 fiber)   %8.1f ns/switch (256 fibers round-robin)\n", name, best1,
              best256);
}

}  // namespace

int main() {
#if defined(SIMT_FIBER_UCONTEXT)
  report<simt::detail::ucontext_fiber::Fiber>("ucontext");
#endif
#if defined(SIMT_FIBER_FCONTEXT)
  report<simt::detail::fcontext_fiber::Fiber>("boost-fcontext");
#endif
#if defined(SIMT_FIBER_ASM)
  report<simt::detail::asm_fiber::Fiber>("asm-x86-64");
#endif
  return 0;
}
