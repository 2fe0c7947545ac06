// The emulator: launches, the fiber scheduler of a CTA, warp collectives and the checks.
#include "simt/simt.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <thread>

#include "simt/fiber.h"

namespace simt {

const char* to_string(Order order) {
  switch (order) {
    case Order::forward:
      return "forward";
    case Order::reverse:
      return "reverse";
    case Order::random:
      return "random";
  }
  return "?";
}

namespace {

using detail::Fiber;

constexpr size_t kStackBytes = 64 * 1024;
constexpr int kWarp = 32;
constexpr uint16_t kMultiReader = 0xffff;
constexpr int kMaxThreads = 1024;

enum class State : uint8_t { runnable, wait_warp, wait_cta, done };
enum class Coll : uint8_t { none, syncwarp, shfl, ldmatrix, ldmatrix_trans, mma_bf16, mma_f16 };

const char* coll_name(Coll c) {
  switch (c) {
    case Coll::none:
      return "-";
    case Coll::syncwarp:
      return "__syncwarp";
    case Coll::shfl:
      return "shfl.sync.bfly";
    case Coll::ldmatrix:
      return "ldmatrix.x4";
    case Coll::ldmatrix_trans:
      return "ldmatrix.x4.trans";
    case Coll::mma_bf16:
      return "mma.m16n8k16.bf16";
    case Coll::mma_f16:
      return "mma.m16n8k16.f16";
  }
  return "?";
}

std::string loc_str(const Loc& loc) {
  std::string f = loc.file_name();
  const size_t slash = f.find_last_of('/');
  if (slash != std::string::npos) f = f.substr(slash + 1);
  return f + ":" + std::to_string(loc.line());
}

bool same_loc(const Loc& a, const Loc& b) {
  return a.line() == b.line() && std::strcmp(a.file_name(), b.file_name()) == 0;
}

std::string dim_str(unsigned x, unsigned y, unsigned z) {
  return "(" + std::to_string(x) + ", " + std::to_string(y) + ", " + std::to_string(z) + ")";
}

std::string hex(const void* p) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%p", p);
  return buf;
}

// Per byte of shared memory: the last write and the reads since, in barrier epochs. The CTA
// epoch advances at every completed __syncthreads, a warp's epoch at every completed __syncwarp
// (and __syncthreads) of that warp. Two accesses by different threads are ordered when the epoch
// advanced in between: the CTA's, or the warp's when both threads are lanes of that warp.
struct Shadow {
  uint32_t w_cta = 0;  // CTA epoch of the last write; 0: never written
  uint32_t w_warp = 0;
  uint32_t r_cta = 0;  // CTA epoch of the reads recorded below
  uint32_t r_warp = 0;
  uint16_t writer = 0;  // thread + 1
  uint16_t reader = 0;  // thread + 1, or kMultiReader
  int16_t reader_warp = -1;  // the readers' warp; -1 for several
  uint8_t pending = 0;       // destination of a cp.async not yet waited for
};

struct Copy {
  uint32_t dst;
  uint8_t cp_size;
  uint8_t src_size;
  unsigned char data[16];
};

struct Thread {
  uint3 idx;
  int linear = 0, warp = 0, lane = 0;
  std::unique_ptr<Fiber> fiber;
  State state = State::runnable;
  Coll coll = Coll::none;
  Loc wait_loc;
  // Operands and results of the warp collective this thread waits in.
  uint32_t in[6] = {};
  float fin[4] = {};
  uint64_t in64 = 0;
  int iarg = 0;
  unsigned mask = 0;
  uint32_t out[4] = {};
  float fout[4] = {};
  uint64_t out64 = 0;
  std::vector<Copy> open;                 // cp.async since the last commit
  std::deque<std::vector<Copy>> groups;   // committed, not waited for
};

struct Warp {
  int first = 0;  // linear index of lane 0
  int lanes = 0;
  int arrived = 0;
  Coll coll = Coll::none;
  Loc loc;
  int first_arrival = 0;
  uint32_t epoch = 1;
};

struct LaunchState {
  Stream* stream = nullptr;
  std::string name;
  dim3 grid, block;
  size_t smem = 0;
  const std::function<void()>* body = nullptr;
  uint64_t nctas = 0;
  std::atomic<uint64_t> next{0};
  std::atomic<bool> failed{false};
  std::atomic<uint64_t> switches{0};
  std::mutex mu;
  std::string error;
  uint64_t error_cta = ~uint64_t{0};

  void record(uint64_t cta, const std::string& msg) {
    std::lock_guard<std::mutex> lock(mu);
    // The lowest failing block wins, so that the message does not depend on the workers' timing.
    if (cta < error_cta) {
      error_cta = cta;
      error = msg;
    }
    failed = true;
  }
};

struct Worker;
thread_local Worker* tl_worker = nullptr;

void thread_main(void* arg);

struct Worker {
  LaunchState* L;
  int nthreads;
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  std::vector<Shadow> shadow;
  uint3 block;
  uint64_t block_linear = 0;
  uint32_t cta_epoch = 1;
  int barrier_arrived = 0;
  Loc barrier_loc;
  int barrier_first = 0;
  int done = 0;
  Thread* current = nullptr;
  bool aborted = false;
  std::string error;
  std::vector<int> order;
  uint64_t switches = 0;

  explicit Worker(LaunchState* l) : L(l) {
    nthreads = static_cast<int>(L->block.x * L->block.y * L->block.z);
    threads.resize(nthreads);
    for (int i = 0; i < nthreads; ++i) {
      Thread& t = threads[i];
      t.linear = i;
      t.idx = {static_cast<unsigned>(i) % L->block.x, static_cast<unsigned>(i) / L->block.x % L->block.y,
               static_cast<unsigned>(i) / (L->block.x * L->block.y)};
      t.warp = i / kWarp;
      t.lane = i % kWarp;
      t.fiber = std::make_unique<Fiber>(kStackBytes);
    }
    warps.resize((nthreads + kWarp - 1) / kWarp);
    for (size_t w = 0; w < warps.size(); ++w) {
      warps[w].first = static_cast<int>(w) * kWarp;
      warps[w].lanes = std::min(kWarp, nthreads - warps[w].first);
    }
    smem_bytes = L->smem;
    smem = static_cast<unsigned char*>(std::aligned_alloc(128, (std::max<size_t>(smem_bytes, 1) + 127) / 128 * 128));
    shadow.resize(smem_bytes);
    order.resize(nthreads);
  }
  ~Worker() { std::free(smem); }

  std::string where(const Thread& t) const {
    return "in kernel " + L->name + ", block " + dim_str(block.x, block.y, block.z) + ", thread " +
           dim_str(t.idx.x, t.idx.y, t.idx.z);
  }

  [[noreturn]] void fail_at(const Thread& t, std::string_view check, std::string_view detail, const Loc& loc) {
    std::string msg = "simt: " + std::string(check) + " " + where(t) + ": " + std::string(detail) + " (at " +
                      loc_str(loc) + ")";
    throw Error(msg);
  }

  std::string thread_name(int linear) const {
    const Thread& t = threads[linear];
    return "thread " + dim_str(t.idx.x, t.idx.y, t.idx.z) + " (warp " + std::to_string(t.warp) + ", lane " +
           std::to_string(t.lane) + ")";
  }

  void run_cta(uint64_t linear) {
    block_linear = linear;
    block = {static_cast<unsigned>(linear % L->grid.x), static_cast<unsigned>(linear / L->grid.x % L->grid.y),
             static_cast<unsigned>(linear / (static_cast<uint64_t>(L->grid.x) * L->grid.y))};
    // Shared memory starts as NaN (0x7fc0 per 16 bits is a NaN as bf16, fp16 and fp32).
    for (size_t i = 0; i + 1 < smem_bytes; i += 2) {
      smem[i] = 0xc0;
      smem[i + 1] = 0x7f;
    }
    std::fill(shadow.begin(), shadow.end(), Shadow{});
    cta_epoch = 1;
    barrier_arrived = 0;
    done = 0;
    aborted = false;
    for (Warp& w : warps) {
      w.arrived = 0;
      w.epoch = 1;
    }
    for (Thread& t : threads) {
      t.state = State::runnable;
      t.coll = Coll::none;
      t.open.clear();
      t.groups.clear();
      t.fiber->start(&thread_main, &t);
    }
    std::mt19937_64 rng(L->stream->seed * 0x9E3779B97F4A7C15ull + linear * 0xBF58476D1CE4E5B9ull + 1);
    for (int i = 0; i < nthreads; ++i) order[i] = L->stream->order == Order::reverse ? nthreads - 1 - i : i;
    while (done < nthreads) {
      if (L->stream->order == Order::random) std::shuffle(order.begin(), order.end(), rng);
      bool ran = false;
      for (int i : order) {
        Thread& t = threads[i];
        if (t.state != State::runnable) continue;
        current = &t;
        t.fiber->resume();
        ++switches;
        ran = true;
        if (aborted) throw Error(error);
      }
      if (!ran && done < nthreads) deadlock();
    }
    current = nullptr;
  }

  [[noreturn]] void deadlock() {
    // Group the threads by what they wait for.
    std::map<std::string, std::vector<int>> groups;
    int first_waiting = -1;
    for (const Thread& t : threads) {
      std::string what;
      if (t.state == State::done) {
        what = "exited";
      } else if (t.state == State::wait_cta) {
        what = "wait at __syncthreads (" + loc_str(t.wait_loc) + ")";
      } else {
        what = std::string("wait in ") + coll_name(t.coll) + " (" + loc_str(t.wait_loc) + ")";
      }
      if (t.state != State::done && first_waiting < 0) first_waiting = t.linear;
      groups[what].push_back(t.linear);
    }
    std::string detail;
    for (const auto& [what, ids] : groups) {
      if (!detail.empty()) detail += "; ";
      detail += std::to_string(ids.size()) + " thread" + (ids.size() == 1 ? "" : "s") + " (" +
                std::to_string(ids.front()) + (ids.size() > 1 ? ".." + std::to_string(ids.back()) : "") + ") " +
                what;
    }
    const Thread& t = threads[first_waiting < 0 ? 0 : first_waiting];
    const bool cta = t.state == State::wait_cta;
    fail_at(t, cta ? "deadlock: __syncthreads not reached by every thread of the block"
                   : "deadlock: warp collective not reached by every lane",
            detail, t.wait_loc);
  }

  // ---- synchronisation -------------------------------------------------------------------
  void yield_current(State s) {
    Thread& t = *current;
    t.state = s;
    t.fiber->yield();
  }

  void syncthreads(const Loc& loc) {
    Thread& t = *current;
    if (barrier_arrived == 0) {
      barrier_loc = loc;
      barrier_first = t.linear;
    } else if (!same_loc(barrier_loc, loc)) {
      fail_at(t, "divergent __syncthreads",
              "this thread waits at " + loc_str(loc) + " while " + thread_name(barrier_first) + " waits at " +
                  loc_str(barrier_loc),
              loc);
    }
    t.wait_loc = loc;
    if (++barrier_arrived == nthreads) {
      barrier_arrived = 0;
      ++cta_epoch;
      for (Warp& w : warps) ++w.epoch;
      for (Thread& o : threads) {
        if (o.state == State::wait_cta) o.state = State::runnable;
      }
      // The last thread to arrive yields too, so that the threads leave the barrier in the
      // configured order.
      yield_current(State::runnable);
      return;
    }
    yield_current(State::wait_cta);
  }

  // Arrives at a warp collective; the last lane to arrive computes it for all lanes.
  void warp_collective(Coll c, const Loc& loc) {
    Thread& t = *current;
    Warp& w = warps[t.warp];
    if (w.arrived == 0) {
      w.coll = c;
      w.loc = loc;
      w.first_arrival = t.linear;
    } else if (w.coll != c || !same_loc(w.loc, loc)) {
      fail_at(t, "divergent warp collective",
              std::string("this lane is in ") + coll_name(c) + " at " + loc_str(loc) + " while " +
                  thread_name(w.first_arrival) + " is in " + coll_name(w.coll) + " at " + loc_str(w.loc),
              loc);
    }
    t.coll = c;
    t.wait_loc = loc;
    if (++w.arrived == w.lanes) {
      w.arrived = 0;
      complete(w, c, loc);
      for (int l = 0; l < w.lanes; ++l) {
        Thread& o = threads[w.first + l];
        if (o.state == State::wait_warp) o.state = State::runnable;
      }
      yield_current(State::runnable);
      return;
    }
    yield_current(State::wait_warp);
  }

  void complete(Warp& w, Coll c, const Loc& loc) {
    Thread* lanes = &threads[w.first];
    switch (c) {
      case Coll::none:
        break;
      case Coll::syncwarp:
        ++w.epoch;
        break;
      case Coll::shfl:
        for (int l = 0; l < w.lanes; ++l) {
          const int src = l ^ lanes[l].iarg;
          lanes[l].out64 = src < w.lanes ? lanes[src].in64 : lanes[l].in64;
        }
        break;
      case Coll::ldmatrix:
      case Coll::ldmatrix_trans:
        complete_ldmatrix(w, lanes, c == Coll::ldmatrix_trans, loc);
        break;
      case Coll::mma_bf16:
      case Coll::mma_f16:
        complete_mma(w, lanes, c == Coll::mma_bf16);
        break;
    }
  }

  void complete_ldmatrix(Warp& w, Thread* lanes, bool trans, const Loc& loc) {
    if (w.lanes != kWarp) fail_at(lanes[0], "ldmatrix in a partial warp", "needs 32 lanes", loc);
    uint16_t m[4][8][8];
    for (int mat = 0; mat < 4; ++mat) {
      for (int r = 0; r < 8; ++r) {
        Thread& src = lanes[mat * 8 + r];
        const uint32_t addr = src.in[0];
        if (addr % 16 != 0) {
          fail_at(src, "misaligned ldmatrix row address",
                  "shared address " + std::to_string(addr) + " is not 16-byte aligned", loc);
        }
        shared_bounds(src, addr, 16, "ldmatrix", loc);
        check_read(src, addr, 16, /*warp_level=*/true, loc);
        std::memcpy(m[mat][r], smem + addr, 16);
      }
    }
    for (int l = 0; l < kWarp; ++l) {
      const int g = l >> 2, t = l & 3;
      for (int mat = 0; mat < 4; ++mat) {
        const uint16_t lo = trans ? m[mat][2 * t][g] : m[mat][g][2 * t];
        const uint16_t hi = trans ? m[mat][2 * t + 1][g] : m[mat][g][2 * t + 1];
        lanes[l].out[mat] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
      }
    }
  }

  void complete_mma(Warp& w, Thread* lanes, bool bf16_inputs) {
    if (w.lanes != kWarp) fail_at(lanes[0], "mma in a partial warp", "needs 32 lanes", lanes[0].wait_loc);
    auto dec = [bf16_inputs](uint32_t u, int half) -> double {
      const auto b = static_cast<uint16_t>(half ? u >> 16 : u & 0xffffu);
      return bf16_inputs ? bf16_bits_to_float(b) : f16_bits_to_float(b);
    };
    double A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < kWarp; ++l) {
      const int g = l >> 2, t = l & 3;
      const Thread& x = lanes[l];
      for (int h = 0; h < 2; ++h) {
        A[g][2 * t + h] = dec(x.in[0], h);
        A[g + 8][2 * t + h] = dec(x.in[1], h);
        A[g][2 * t + 8 + h] = dec(x.in[2], h);
        A[g + 8][2 * t + 8 + h] = dec(x.in[3], h);
        B[2 * t + h][g] = dec(x.in[4], h);
        B[2 * t + 8 + h][g] = dec(x.in[5], h);
        C[g][2 * t + h] = x.fin[h];
        C[g + 8][2 * t + h] = x.fin[2 + h];
      }
    }
    // Products of 16-bit inputs are exact; the sum of the 16 products and C is formed in double
    // and rounded once to fp32 (the tensor core's internal accumulation order is not modelled).
    float D[16][8];
    for (int i = 0; i < 16; ++i) {
      for (int j = 0; j < 8; ++j) {
        double s = C[i][j];
        for (int k = 0; k < 16; ++k) s += A[i][k] * B[k][j];
        D[i][j] = static_cast<float>(s);
      }
    }
    for (int l = 0; l < kWarp; ++l) {
      const int g = l >> 2, t = l & 3;
      lanes[l].fout[0] = D[g][2 * t];
      lanes[l].fout[1] = D[g][2 * t + 1];
      lanes[l].fout[2] = D[g + 8][2 * t];
      lanes[l].fout[3] = D[g + 8][2 * t + 1];
    }
  }

  // ---- shared memory ---------------------------------------------------------------------
  void shared_bounds(const Thread& t, uint64_t off, size_t bytes, const char* what, const Loc& loc) {
    if (off + bytes > smem_bytes) {
      fail_at(t, "shared memory out of bounds",
              std::string(what) + " of " + std::to_string(bytes) + " bytes at shared address " + std::to_string(off) +
                  " passes the end of the block's " + std::to_string(smem_bytes) + " bytes of dynamic shared memory",
              loc);
    }
  }

  uint32_t shared_offset(const Thread& t, const void* p, size_t bytes, const char* what, const Loc& loc) {
    const auto a = reinterpret_cast<uintptr_t>(p), b = reinterpret_cast<uintptr_t>(smem);
    if (a < b || a + bytes > b + smem_bytes) {
      fail_at(t, "shared memory out of bounds",
              std::string(what) + " of " + std::to_string(bytes) + " bytes at " + hex(p) +
                  " is not inside the block's " + std::to_string(smem_bytes) + " bytes of dynamic shared memory",
              loc);
    }
    return static_cast<uint32_t>(a - b);
  }

  bool ordered(uint32_t epoch_cta, uint32_t epoch_warp, int other_warp, int warp) const {
    return epoch_cta != cta_epoch || (other_warp == warp && warps[warp].epoch != epoch_warp);
  }

  // A read of [off, off+bytes) by thread t (warp_level: by t's whole warp, as ldmatrix reads).
  void check_read(const Thread& t, uint32_t off, size_t bytes, bool warp_level, const Loc& loc) {
    for (uint32_t b = off; b < off + bytes; ++b) {
      Shadow& s = shadow[b];
      if (s.pending) {
        fail_at(t, "read before cp.async.wait_group",
                "shared bytes [" + std::to_string(b) + ", " + std::to_string(off + bytes) +
                    ") are the destination of a cp.async of " + thread_name(s.writer - 1) +
                    " that has not landed (no cp.async.wait_group covers it yet)",
                loc);
      }
      if (s.writer == 0) {
        fail_at(t, "read of uninitialised shared memory",
                "shared byte " + std::to_string(b) + " was never written in this block", loc);
      }
      const int wr = s.writer - 1;
      const bool own = !warp_level && wr == t.linear;
      if (!own && !ordered(s.w_cta, s.w_warp, threads[wr].warp, t.warp)) {
        fail_at(t, "shared-memory race (read after write)",
                std::string(warp_level ? "this warp" : "this thread") + " reads shared byte " + std::to_string(b) +
                    " written by " + thread_name(wr) + " with no barrier in between that both crossed",
                loc);
      }
      const uint16_t me = warp_level ? kMultiReader : static_cast<uint16_t>(t.linear + 1);
      if (s.r_cta != cta_epoch || s.reader == 0) {
        s.r_cta = cta_epoch;
        s.reader = me;
        s.reader_warp = static_cast<int16_t>(t.warp);
      } else {
        if (s.reader != me) s.reader = kMultiReader;
        if (s.reader_warp != t.warp) s.reader_warp = -1;
      }
      s.r_warp = warps[t.warp].epoch;
    }
  }

  void check_write(const Thread& t, uint32_t off, size_t bytes, const Loc& loc) {
    for (uint32_t b = off; b < off + bytes; ++b) {
      Shadow& s = shadow[b];
      if (s.pending) {
        fail_at(t, "write to the destination of a cp.async in flight",
                "shared byte " + std::to_string(b) + " awaits a cp.async of " + thread_name(s.writer - 1), loc);
      }
      if (s.reader != 0 && s.r_cta == cta_epoch && s.reader != t.linear + 1 &&
          !(s.reader_warp == t.warp && warps[t.warp].epoch != s.r_warp)) {
        fail_at(t, "shared-memory race (write after read)",
                "this thread writes shared byte " + std::to_string(b) + " that " +
                    (s.reader == kMultiReader ? std::string("other threads") : thread_name(s.reader - 1)) +
                    " read with no barrier in between that both crossed",
                loc);
      }
      if (s.writer != 0 && s.writer != t.linear + 1 &&
          !ordered(s.w_cta, s.w_warp, threads[s.writer - 1].warp, t.warp)) {
        fail_at(t, "shared-memory race (write after write)",
                "this thread writes shared byte " + std::to_string(b) + " written by " + thread_name(s.writer - 1) +
                    " with no barrier in between that both crossed",
                loc);
      }
      mark_written(t, b);
    }
  }

  void mark_written(const Thread& t, uint32_t b) {
    Shadow& s = shadow[b];
    s.writer = static_cast<uint16_t>(t.linear + 1);
    s.w_cta = cta_epoch;
    s.w_warp = warps[t.warp].epoch;
    s.pending = 0;
  }

  // ---- cp.async ---------------------------------------------------------------------------
  void cp_async(uint32_t dst, const void* src, int cp_size, int src_size, const Loc& loc) {
    Thread& t = *current;
    if (cp_size != 4 && cp_size != 8 && cp_size != 16) {
      fail_at(t, "invalid cp.async", "cp-size " + std::to_string(cp_size) + " is not 4, 8 or 16", loc);
    }
    if (src_size < 0 || src_size > cp_size) {
      fail_at(t, "invalid cp.async", "src-size " + std::to_string(src_size) + " is not in [0, cp-size]", loc);
    }
    if (dst % cp_size != 0) {
      fail_at(t, "misaligned cp.async",
              "destination shared address " + std::to_string(dst) + " is not " + std::to_string(cp_size) +
                  "-byte aligned",
              loc);
    }
    if (reinterpret_cast<uintptr_t>(src) % cp_size != 0) {
      fail_at(t, "misaligned cp.async",
              "source " + hex(src) + " is not " + std::to_string(cp_size) + "-byte aligned", loc);
    }
    shared_bounds(t, dst, cp_size, "cp.async destination", loc);
    Copy c{dst, static_cast<uint8_t>(cp_size), static_cast<uint8_t>(src_size), {}};
    if (src_size > 0) {
      global_check(t, src, src_size, 1, Access::read, "cp.async source", loc);
      std::memcpy(c.data, src, src_size);
    }
    check_write(t, dst, cp_size, loc);
    for (int i = 0; i < cp_size; ++i) {
      shadow[dst + i].pending = 1;
      smem[dst + i] = (i & 1) ? 0x7f : 0xc0;  // NaN until the copy lands
    }
    t.open.push_back(c);
  }

  void cp_async_commit() {
    Thread& t = *current;
    t.groups.push_back(std::move(t.open));
    t.open.clear();
  }

  void cp_async_wait_group(int n) {
    Thread& t = *current;
    while (static_cast<int>(t.groups.size()) > n) {
      for (const Copy& c : t.groups.front()) {
        std::memcpy(smem + c.dst, c.data, c.src_size);
        std::memset(smem + c.dst + c.src_size, 0, c.cp_size - c.src_size);
        for (int i = 0; i < c.cp_size; ++i) mark_written(t, c.dst + i);
      }
      t.groups.pop_front();
    }
  }

  // ---- global memory ----------------------------------------------------------------------
  void global_check(const Thread& t, const void* p, size_t bytes, size_t align, Access access, const char* what,
                    const Loc& loc) {
    const auto a = reinterpret_cast<uintptr_t>(p);
    if (align > 1 && a % align != 0) {
      fail_at(t, "misaligned global access",
              std::string(what) + " of " + std::to_string(bytes) + " bytes at " + hex(p) + " is not " +
                  std::to_string(align) + "-byte aligned",
              loc);
    }
    const MemRange* nearest = nullptr;
    int64_t best = INT64_MAX;
    for (const MemRange& r : L->stream->ranges) {
      const auto b = reinterpret_cast<uintptr_t>(r.base);
      if (a >= b && a + bytes <= b + r.bytes) return;
      const int64_t d = a < b ? static_cast<int64_t>(b - a) : static_cast<int64_t>(a + bytes - (b + r.bytes));
      if (d < best) {
        best = d;
        nearest = &r;
      }
    }
    std::string detail = std::string(what) + " of " + std::to_string(bytes) + " bytes at " + hex(p) +
                         " lies outside every tensor registered for the launch";
    if (nearest != nullptr) {
      const auto b = reinterpret_cast<uintptr_t>(nearest->base);
      const int64_t off = static_cast<int64_t>(a) - static_cast<int64_t>(b);
      detail += " (nearest: '" + nearest->name + "', " + std::to_string(nearest->bytes) + " bytes; the access is at byte offset " +
                std::to_string(off) + ")";
    }
    const char* kind = access == Access::read ? "out-of-bounds global read"
                       : access == Access::write ? "out-of-bounds global write"
                                                 : "out-of-bounds global atomic";
    fail_at(t, kind, detail, loc);
  }
};

void thread_main(void* arg) {
  Worker* w = tl_worker;
  Thread* t = static_cast<Thread*>(arg);
  try {
    (*w->L->body)();
  } catch (const Error& e) {
    if (!w->aborted) {
      w->aborted = true;
      w->error = e.what();
    }
  } catch (const std::exception& e) {
    if (!w->aborted) {
      w->aborted = true;
      w->error = "simt: exception " + w->where(*t) + ": " + e.what();
    }
  }
  t->state = State::done;
  ++w->done;
}

Worker& cur(const char* what) {
  if (tl_worker == nullptr || tl_worker->current == nullptr) {
    throw std::logic_error(std::string("simt: ") + what + " called outside a kernel launch");
  }
  return *tl_worker;
}

std::mutex g_attr_mu;
std::map<const void*, size_t> g_max_dynamic_smem;

}  // namespace

// ---- host side ------------------------------------------------------------------------------
void func_set_max_dynamic_smem(const void* kernel, size_t bytes) {
  if (bytes > kMaxDynamicSmem) {
    throw Error("simt: cudaFuncSetAttribute(MaxDynamicSharedMemorySize) of " + std::to_string(bytes) +
                " bytes is above the device's " + std::to_string(kMaxDynamicSmem) + " bytes");
  }
  std::lock_guard<std::mutex> lock(g_attr_mu);
  g_max_dynamic_smem[kernel] = bytes;
}

void launch(Stream* stream, std::string_view kernel_name, const void* kernel_id, dim3 grid, dim3 block,
            size_t dynamic_smem, const std::function<void()>& body) {
  if (stream == nullptr) throw Error("simt: launch of " + std::string(kernel_name) + " without a simt::Stream");
  const std::string name(kernel_name);
  const uint64_t nthreads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (nthreads == 0 || nthreads > kMaxThreads) {
    throw Error("simt: invalid launch of " + name + ": " + std::to_string(nthreads) + " threads per block");
  }
  if (dynamic_smem > kMaxDynamicSmem) {
    throw Error("simt: dynamic shared memory above the device maximum in kernel " + name + ": " +
                std::to_string(dynamic_smem) + " bytes requested, " + std::to_string(kMaxDynamicSmem) + " allowed");
  }
  size_t declared = kDefaultDynamicSmem;
  {
    std::lock_guard<std::mutex> lock(g_attr_mu);
    auto it = g_max_dynamic_smem.find(kernel_id);
    if (it != g_max_dynamic_smem.end()) declared = std::max(declared, it->second);
  }
  if (dynamic_smem > declared) {
    throw Error("simt: dynamic shared memory above the kernel's declared size in kernel " + name + ": " +
                std::to_string(dynamic_smem) + " bytes requested, " + std::to_string(declared) +
                " declared (cudaFuncSetAttribute MaxDynamicSharedMemorySize)");
  }
  LaunchState L;
  L.stream = stream;
  L.name = name;
  L.grid = grid;
  L.block = block;
  L.smem = dynamic_smem;
  L.body = &body;
  L.nctas = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  ++stream->stats.launches;
  if (L.nctas == 0) return;
  int workers = stream->workers;
  if (workers <= 0) {
    const char* env = std::getenv("SIMT_WORKERS");
    workers = env != nullptr ? std::atoi(env) : static_cast<int>(std::thread::hardware_concurrency());
  }
  workers = static_cast<int>(std::clamp<uint64_t>(static_cast<uint64_t>(std::max(workers, 1)), 1, L.nctas));

  auto work = [&L] {
    Worker w(&L);
    tl_worker = &w;
    for (;;) {
      if (L.failed) break;
      const uint64_t cta = L.next.fetch_add(1);
      if (cta >= L.nctas) break;
      try {
        w.run_cta(cta);
      } catch (const Error& e) {
        L.record(cta, e.what());
      }
    }
    L.switches += w.switches;
    tl_worker = nullptr;
  };
  if (workers == 1) {
    work();
  } else {
    std::vector<std::thread> pool;
    for (int i = 0; i < workers; ++i) pool.emplace_back(work);
    for (auto& th : pool) th.join();
  }
  stream->stats.ctas += L.nctas;
  stream->stats.switches += L.switches;
  if (L.failed) throw Error(L.error);
}

// ---- device side ----------------------------------------------------------------------------
const uint3& thread_idx() { return cur("threadIdx").current->idx; }
const uint3& block_idx() { return cur("blockIdx").block; }
const dim3& block_dim() { return cur("blockDim").L->block; }
const dim3& grid_dim() { return cur("gridDim").L->grid; }

unsigned char* dynamic_smem() { return cur("extern __shared__").smem; }

uint32_t cvta_shared(const void* p, Loc loc) {
  Worker& w = cur("__cvta_generic_to_shared");
  const auto a = reinterpret_cast<uintptr_t>(p), b = reinterpret_cast<uintptr_t>(w.smem);
  if (a < b || a > b + w.smem_bytes) {
    w.fail_at(*w.current, "not a shared-memory address",
              "__cvta_generic_to_shared of " + hex(p) + ", outside the block's dynamic shared memory", loc);
  }
  return static_cast<uint32_t>(a - b);
}

void syncthreads(Loc loc) { cur("__syncthreads").syncthreads(loc); }

void syncwarp(unsigned mask, Loc loc) {
  Worker& w = cur("__syncwarp");
  const Warp& wp = w.warps[w.current->warp];
  const unsigned full = wp.lanes == kWarp ? 0xffffffffu : ((1u << wp.lanes) - 1u);
  if (mask != full) w.fail_at(*w.current, "unsupported __syncwarp", "only the full-warp mask is emulated", loc);
  w.warp_collective(Coll::syncwarp, loc);
}

uint64_t shfl_xor_bits(unsigned mask, uint64_t bits, int lane_mask, int width, Loc loc) {
  Worker& w = cur("__shfl_xor_sync");
  Thread& t = *w.current;
  const Warp& wp = w.warps[t.warp];
  const unsigned full = wp.lanes == kWarp ? 0xffffffffu : ((1u << wp.lanes) - 1u);
  if (mask != full) w.fail_at(t, "unsupported __shfl_xor_sync", "only the full-warp mask is emulated", loc);
  if (width != kWarp) w.fail_at(t, "unsupported __shfl_xor_sync", "only width 32 is emulated", loc);
  if (lane_mask < 0 || lane_mask >= kWarp) {
    w.fail_at(t, "invalid __shfl_xor_sync", "lane mask " + std::to_string(lane_mask) + " is not in [0, 32)", loc);
  }
  t.in64 = bits;
  t.iarg = lane_mask;
  w.warp_collective(Coll::shfl, loc);
  return t.out64;
}

void ldmatrix(uint32_t (&r)[4], uint32_t addr, bool trans, Loc loc) {
  Worker& w = cur("ldmatrix");
  Thread& t = *w.current;
  t.in[0] = addr;
  w.warp_collective(trans ? Coll::ldmatrix_trans : Coll::ldmatrix, loc);
  for (int i = 0; i < 4; ++i) r[i] = t.out[i];
}

void mma_m16n8k16(MmaType type, float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, Loc loc) {
  Worker& w = cur("mma");
  Thread& t = *w.current;
  for (int i = 0; i < 4; ++i) {
    t.in[i] = a[i];
    t.fin[i] = d[i];
  }
  t.in[4] = b0;
  t.in[5] = b1;
  w.warp_collective(type == MmaType::bf16 ? Coll::mma_bf16 : Coll::mma_f16, loc);
  for (int i = 0; i < 4; ++i) d[i] = t.fout[i];
}

void cp_async(uint32_t dst, const void* src, int cp_size, int src_size, Loc loc) {
  cur("cp.async").cp_async(dst, src, cp_size, src_size, loc);
}

void cp_async_commit(Loc) { cur("cp.async.commit_group").cp_async_commit(); }

void cp_async_wait_group(int pending, Loc) { cur("cp.async.wait_group").cp_async_wait_group(pending); }

void check_global(const void* p, size_t bytes, size_t align, Access access, Loc loc) {
  Worker& w = cur("global access");
  w.global_check(*w.current, p, bytes, align, access,
                 access == Access::read ? "load" : access == Access::write ? "store" : "atomic", loc);
}

void check_shared_read(const void* p, size_t bytes, size_t align, Loc loc) {
  Worker& w = cur("shared load");
  const uint32_t off = w.shared_offset(*w.current, p, bytes, "load", loc);
  if (align > 1 && off % align != 0) {
    w.fail_at(*w.current, "misaligned shared access",
              "load of " + std::to_string(bytes) + " bytes at shared address " + std::to_string(off) + " is not " +
                  std::to_string(align) + "-byte aligned",
              loc);
  }
  w.check_read(*w.current, off, bytes, false, loc);
}

void check_shared_write(const void* p, size_t bytes, size_t align, Loc loc) {
  Worker& w = cur("shared store");
  const uint32_t off = w.shared_offset(*w.current, p, bytes, "store", loc);
  if (align > 1 && off % align != 0) {
    w.fail_at(*w.current, "misaligned shared access",
              "store of " + std::to_string(bytes) + " bytes at shared address " + std::to_string(off) + " is not " +
                  std::to_string(align) + "-byte aligned",
              loc);
  }
  w.check_write(*w.current, off, bytes, loc);
}

float atomic_add(float* p, float v, Loc loc) {
  Worker& w = cur("atomicAdd");
  w.global_check(*w.current, p, 4, 4, Access::atomic, "atomicAdd(float)", loc);
  return std::atomic_ref<float>(*p).fetch_add(v, std::memory_order_relaxed);
}

float2 atomic_add(float2* p, float2 v, Loc loc) {
  Worker& w = cur("atomicAdd");
  w.global_check(*w.current, p, 8, 8, Access::atomic, "atomicAdd(float2)", loc);
  // sm_90's vector atomic is atomic per element, as here.
  const float x = std::atomic_ref<float>(p->x).fetch_add(v.x, std::memory_order_relaxed);
  const float y = std::atomic_ref<float>(p->y).fetch_add(v.y, std::memory_order_relaxed);
  return {x, y};
}

void kernel_assert(bool ok, const char* expr, Loc loc) {
  if (ok) return;
  Worker& w = cur("CUDA_KERNEL_ASSERT");
  w.fail_at(*w.current, "device assertion failed", expr, loc);
}

void fail(std::string_view check, std::string_view detail, Loc loc) {
  Worker& w = cur("simt::fail");
  w.fail_at(*w.current, check, detail, loc);
}

}  // namespace simt
