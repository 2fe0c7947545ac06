#pragma once
// Fibers of the emulator: one per CUDA thread, switched cooperatively on one OS thread.
//
// Three interchangeable context-switch backends with one interface (resume / yield):
//   SIMT_FIBER_ASM       hand-written x86-64 System V switch (callee-saved registers, MXCSR, x87 CW)
//   SIMT_FIBER_FCONTEXT  Boost.Context's fcontext (Debian libboost-context-dev)
//   SIMT_FIBER_UCONTEXT  glibc makecontext/swapcontext (saves the signal mask: a syscall per switch)
// The emulator is built with exactly one of them (CMake option SIMT_FIBER, see README.md); the
// switch benchmark (bench/switch_bench.cpp) builds all that are available, each in its own namespace.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <stdexcept>

#if defined(SIMT_FIBER_FCONTEXT)
#include <boost/context/detail/fcontext.hpp>
#endif
#if defined(SIMT_FIBER_UCONTEXT)
#include <ucontext.h>
#endif

namespace simt::detail {

// A fiber stack from mmap with a guard page below it, so that an overflow faults instead of
// silently corrupting the neighbouring fiber.
class FiberStack {
 public:
  explicit FiberStack(size_t bytes) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    size_ = (bytes + page - 1) / page * page + page;
    void* p = mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    mprotect(p, page, PROT_NONE);
    base_ = static_cast<char*>(p);
    bottom_ = base_ + page;
  }
  FiberStack(const FiberStack&) = delete;
  FiberStack& operator=(const FiberStack&) = delete;
  ~FiberStack() { munmap(base_, size_); }
  char* bottom() const { return bottom_; }
  char* top() const { return base_ + size_; }
  size_t usable() const { return static_cast<size_t>(top() - bottom_); }

 private:
  char* base_ = nullptr;
  char* bottom_ = nullptr;
  size_t size_ = 0;
};

using FiberFn = void (*)(void*);

}  // namespace simt::detail

#define SIMT_DEFINE_FIBER_COMMON                                                              \
 public:                                                                                      \
  explicit Fiber(size_t stack_bytes) : stack_(stack_bytes) {}                                 \
  Fiber(const Fiber&) = delete;                                                               \
  Fiber& operator=(const Fiber&) = delete;                                                    \
  bool finished() const { return finished_; }                                                 \
                                                                                              \
 private:                                                                                     \
  ::simt::detail::FiberStack stack_;                                                          \
  ::simt::detail::FiberFn fn_ = nullptr;                                                      \
  void* arg_ = nullptr;                                                                       \
  bool finished_ = false;

#if defined(SIMT_FIBER_ASM)
#if !defined(__x86_64__)
#error "SIMT_FIBER_ASM is an x86-64 System V context switch"
#endif
extern "C" void simt_asm_switch(void** save_sp, void* load_sp);
extern "C" void simt_asm_trampoline();
namespace simt::detail::asm_fiber {
// Saves rbp, rbx, r12–r15, MXCSR and the x87 control word on the current stack, stores the stack
// pointer in *save_sp, loads load_sp and restores the same set from there. A fresh fiber's stack
// is laid out so that the first switch "returns" into the trampoline with fn in r12, arg in r13.
class Fiber {
  SIMT_DEFINE_FIBER_COMMON
 public:
  void start(FiberFn fn, void* arg) {
    fn_ = fn;
    arg_ = arg;
    finished_ = false;
    auto top = reinterpret_cast<uintptr_t>(stack_.top()) & ~uintptr_t{15};
    auto* slot = reinterpret_cast<uint64_t*>(top - 24);  // trampoline address; rsp = top-16 after ret
    slot[0] = reinterpret_cast<uint64_t>(&simt_asm_trampoline);
    slot[-1] = 0;                                      // rbp
    slot[-2] = 0;                                      // rbx
    slot[-3] = reinterpret_cast<uint64_t>(&entry);     // r12
    slot[-4] = reinterpret_cast<uint64_t>(this);       // r13
    slot[-5] = 0;                                      // r14
    slot[-6] = 0;                                      // r15
    uint32_t mxcsr;
    uint16_t fpcw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpcw));
    auto* fp = reinterpret_cast<uint32_t*>(slot - 7);
    fp[0] = mxcsr;
    fp[1] = fpcw;
    sp_ = slot - 7;
  }
  void resume() { simt_asm_switch(&caller_sp_, sp_); }
  void yield() { simt_asm_switch(&sp_, caller_sp_); }

 private:
  static void entry(void* self) {
    auto* f = static_cast<Fiber*>(self);
    f->fn_(f->arg_);
    f->finished_ = true;
    for (;;) f->yield();
  }
  void* sp_ = nullptr;
  void* caller_sp_ = nullptr;
};
}  // namespace simt::detail::asm_fiber
#endif

#if defined(SIMT_FIBER_FCONTEXT)
namespace simt::detail::fcontext_fiber {
namespace bc = boost::context::detail;
class Fiber {
  SIMT_DEFINE_FIBER_COMMON
 public:
  void start(FiberFn fn, void* arg) {
    fn_ = fn;
    arg_ = arg;
    finished_ = false;
    ctx_ = bc::make_fcontext(stack_.top(), stack_.usable(), &entry);
  }
  void resume() { ctx_ = bc::jump_fcontext(ctx_, this).fctx; }
  void yield() { caller_ = bc::jump_fcontext(caller_, nullptr).fctx; }

 private:
  static void entry(bc::transfer_t t) {
    auto* f = static_cast<Fiber*>(t.data);
    f->caller_ = t.fctx;
    f->fn_(f->arg_);
    f->finished_ = true;
    for (;;) f->yield();
  }
  bc::fcontext_t ctx_ = nullptr;
  bc::fcontext_t caller_ = nullptr;
};
}  // namespace simt::detail::fcontext_fiber
#endif

#if defined(SIMT_FIBER_UCONTEXT)
namespace simt::detail::ucontext_fiber {
class Fiber {
  SIMT_DEFINE_FIBER_COMMON
 public:
  void start(FiberFn fn, void* arg) {
    fn_ = fn;
    arg_ = arg;
    finished_ = false;
    getcontext(&ctx_);
    ctx_.uc_stack.ss_sp = stack_.bottom();
    ctx_.uc_stack.ss_size = stack_.usable();
    ctx_.uc_link = nullptr;
    const auto self = reinterpret_cast<uintptr_t>(this);
    makecontext(&ctx_, reinterpret_cast<void (*)()>(&entry), 2, static_cast<unsigned>(self >> 32),
                static_cast<unsigned>(self & 0xffffffffu));
  }
  void resume() { swapcontext(&caller_, &ctx_); }
  void yield() { swapcontext(&ctx_, &caller_); }

 private:
  static void entry(unsigned hi, unsigned lo) {
    auto* f = reinterpret_cast<Fiber*>((static_cast<uintptr_t>(hi) << 32) | lo);
    f->fn_(f->arg_);
    f->finished_ = true;
    for (;;) f->yield();
  }
  ucontext_t ctx_{};
  ucontext_t caller_{};
};
}  // namespace simt::detail::ucontext_fiber
#endif

namespace simt::detail {
#if defined(SIMT_FIBER_ASM)
using Fiber = asm_fiber::Fiber;
constexpr const char* kFiberBackend = "asm-x86-64";
#elif defined(SIMT_FIBER_FCONTEXT)
using Fiber = fcontext_fiber::Fiber;
constexpr const char* kFiberBackend = "boost-fcontext";
#elif defined(SIMT_FIBER_UCONTEXT)
using Fiber = ucontext_fiber::Fiber;
constexpr const char* kFiberBackend = "ucontext";
#endif
}  // namespace simt::detail
