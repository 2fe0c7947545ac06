// The emulator's checks: five planted bugs (an out-of-bounds read, a missing __syncthreads before
// a shared read, a barrier in a divergent branch, a misaligned cp.async, a read before
// cp.async.wait_group), each caught in every lane order with a message naming the check, the
// kernel, the block and the thread; and the other checks (launch limits, shared bounds, warp
// collectives, device asserts).
#include <catch2/catch.hpp>

#include <cmath>
#include <vector>

#include "test_util.h"
#include "torch_mla/cores/cuda/mla_mma.cuh"

namespace {

using namespace torch_mla::cuda;
using Catch::Matchers::Contains;
using simt_test::kOrders;
using simt_test::make_stream;

// Runs f(stream) in every lane order and returns the messages of the errors it threw ("" if none).
template <typename F>
std::vector<std::string> errors_in_every_order(F&& f) {
  std::vector<std::string> msgs;
  for (simt::Order order : kOrders) {
    simt::Stream s = make_stream(order, 5);
    try {
      f(s);
      msgs.emplace_back();
    } catch (const simt::Error& e) {
      msgs.emplace_back(e.what());
    }
  }
  return msgs;
}

// ---- planted bug 1: an out-of-bounds read -----------------------------------------------------
// Each thread copies row tid of an n × 8 bf16 matrix through cp.async; the last block's rows go
// one row past the end (the bug: no `r < n` guard).
__global__ void oob_cp_async_kernel(const simt::bf16* src, int n, simt::bf16* dst) {
  TORCH_MLA_DYNAMIC_SMEM(smem);
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  const uint32_t s = smem_addr(smem) + threadIdx.x * 16;
  cp_async_16(s, src + r * 8, true);  // BUG: valid should be r < n
  cp_async_commit();
  cp_async_wait<0>();
  if (r < n) global_ref(reinterpret_cast<uint4*>(dst + r * 8)) = load_shared(reinterpret_cast<const uint4*>(smem + threadIdx.x * 16));
}

__global__ void oob_load_kernel(const float* src, int n, float* dst) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) global_ref(&dst[i < n ? i : 0]) = load_global(&src[i]);  // BUG: i <= n
}

TEST_CASE("planted bug: out-of-bounds global read", "[simt][checks]") {
  const int n = 60;
  std::vector<simt::bf16> src(63 * 8), dst(63 * 8);  // 63 rows: only row 63 is out of bounds
  std::vector<float> fs(n), fd(n);
  for (const auto& msg : errors_in_every_order([&](simt::Stream& s) {
         s.register_memory(src.data(), src.size() * 2, "src");
         s.register_memory(dst.data(), dst.size() * 2, "dst");
         simt::launch<oob_cp_async_kernel>(&s, 2, 32, 32 * 16, src.data(), 63, dst.data());
       })) {
    CHECK_THAT(msg, Contains("simt: out-of-bounds global read in kernel") && Contains("oob_cp_async_kernel") &&
                        Contains("block (1, 0, 0)") && Contains("thread (31, 0, 0)") &&
                        Contains("cp.async source of 16 bytes") && Contains("'src'") && Contains("byte offset 1008"));
  }
  for (const auto& msg : errors_in_every_order([&](simt::Stream& s) {
         s.register_memory(fs.data(), fs.size() * 4, "src");
         s.register_memory(fd.data(), fd.size() * 4, "dst");
         simt::launch<oob_load_kernel>(&s, 2, 32, 0, fs.data(), n, fd.data());
       })) {
    CHECK_THAT(msg, Contains("simt: out-of-bounds global read in kernel") && Contains("oob_load_kernel") &&
                        Contains("block (1, 0, 0)") && Contains("thread (28, 0, 0)") && Contains("byte offset 240"));
  }
}

// ---- planted bug 2: a missing __syncthreads before a shared read ------------------------------
// Phase 1 writes and publishes a buffer; in phase 2 warp 1 overwrites it and warp 0 reads it with
// no barrier in between. Whichever warp runs first, the emulator sees unordered accesses of two
// threads to the same bytes: a read after a write, or a write after a read.
__global__ void missing_barrier_kernel(float* out) {
  TORCH_MLA_DYNAMIC_SMEM(smem);
  float* buf = reinterpret_cast<float*>(smem);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  store_shared(&buf[tid], 1.f);
  __syncthreads();
  if (warp == 1) store_shared(&buf[lane], 2.f);
  // BUG: __syncthreads() missing here
  if (warp == 0) global_ref(&out[lane]) = load_shared(&buf[lane]);
}

TEST_CASE("planted bug: missing __syncthreads before a shared read", "[simt][checks]") {
  std::vector<float> out(32);
  const auto msgs = errors_in_every_order([&](simt::Stream& s) {
    s.register_memory(out.data(), out.size() * 4, "out");
    simt::launch<missing_barrier_kernel>(&s, 1, 64, 64 * 4, out.data());
  });
  for (const auto& msg : msgs) {
    CHECK_THAT(msg, Contains("simt: shared-memory race") && Contains("missing_barrier_kernel") &&
                        Contains("block (0, 0, 0)") && Contains("with no barrier in between that both crossed"));
  }
  // Forward order runs warp 0 first: warp 1's write then finds warp 0's read.
  CHECK_THAT(msgs[0], Contains("(write after read)") && Contains("thread (32, 0, 0)"));
  // Reverse order runs warp 1 first: warp 0's read then finds warp 1's write.
  CHECK_THAT(msgs[1], Contains("(read after write)") && Contains("thread (31, 0, 0)") &&
                          Contains("written by thread (63, 0, 0) (warp 1, lane 31)"));
}

// ---- planted bug 3: a barrier in a divergent branch -------------------------------------------
__global__ void divergent_barrier_kernel(float* out) {
  TORCH_MLA_DYNAMIC_SMEM(smem);
  float* buf = reinterpret_cast<float*>(smem);
  const int tid = threadIdx.x;
  store_shared(&buf[tid], static_cast<float>(tid));
  if (tid < 64) {
    __syncthreads();  // BUG: threads 64.. never get here
    global_ref(&out[tid]) = load_shared(&buf[127 - tid]);
  }
}

// Two barriers at different places: bar.sync would even let this pass on the GPU, by accident.
__global__ void split_barrier_kernel(float* out) {
  const int tid = threadIdx.x;
  if (tid < 64) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  global_ref(&out[tid]) = 1.f;
}

TEST_CASE("planted bug: a barrier in a divergent branch", "[simt][checks]") {
  std::vector<float> out(128);
  for (const auto& msg : errors_in_every_order([&](simt::Stream& s) {
         s.register_memory(out.data(), out.size() * 4, "out");
         simt::launch<divergent_barrier_kernel>(&s, 1, 128, 128 * 4, out.data());
       })) {
    CHECK_THAT(msg, Contains("simt: deadlock: __syncthreads not reached by every thread of the block in kernel") &&
                        Contains("divergent_barrier_kernel") && Contains("block (0, 0, 0)") &&
                        Contains("64 threads (0..63) wait at __syncthreads (test_checks.cpp:") &&
                        Contains("64 threads (64..127) exited"));
  }
  for (const auto& msg : errors_in_every_order([&](simt::Stream& s) {
         s.register_memory(out.data(), out.size() * 4, "out");
         simt::launch<split_barrier_kernel>(&s, 1, 128, 0, out.data());
       })) {
    CHECK_THAT(msg, Contains("simt: divergent __syncthreads in kernel") && Contains("split_barrier_kernel"));
  }
}

// ---- planted bug 4: a misaligned cp.async -----------------------------------------------------
// Rows of 12 bf16 (24 bytes) copied in 16-byte chunks: odd rows do not start on 16 bytes.
__global__ void misaligned_cp_async_kernel(const simt::bf16* src) {
  TORCH_MLA_DYNAMIC_SMEM(smem);
  const int r = threadIdx.x;
  cp_async_16(smem_addr(smem) + r * 16, src + r * 12, true);  // BUG: row stride 12 elements
  cp_async_commit();
  cp_async_wait<0>();
}

__global__ void misaligned_smem_cp_async_kernel(const simt::bf16* src) {
  TORCH_MLA_DYNAMIC_SMEM(smem);
  const int r = threadIdx.x;
  cp_async_16(smem_addr(smem) + r * 24, src + r * 8, true);  // BUG: destination stride 24 bytes
  cp_async_commit();
  cp_async_wait<0>();
}

TEST_CASE("planted bug: a misaligned cp.async", "[simt][checks]") {
  std::vector<simt::bf16> src(32 * 12);
  // The first odd row to run fails: thread 1 in forward order, thread 31 in reverse order.
  auto msgs = errors_in_every_order([&](simt::Stream& s) {
    s.register_memory(src.data(), src.size() * 2, "src");
    simt::launch<misaligned_cp_async_kernel>(&s, 1, 32, 32 * 16, src.data());
  });
  for (const auto& msg : msgs) {
    CHECK_THAT(msg, Contains("simt: misaligned cp.async in kernel") && Contains("misaligned_cp_async_kernel") &&
                        Contains("block (0, 0, 0)") && Contains("is not 16-byte aligned"));
  }
  CHECK_THAT(msgs[0], Contains("thread (1, 0, 0)"));
  CHECK_THAT(msgs[1], Contains("thread (31, 0, 0)"));
  msgs = errors_in_every_order([&](simt::Stream& s) {
    s.register_memory(src.data(), src.size() * 2, "src");
    simt::launch<misaligned_smem_cp_async_kernel>(&s, 1, 32, 32 * 24, src.data());
  });
  for (const auto& msg : msgs) CHECK_THAT(msg, Contains("simt: misaligned cp.async in kernel"));
  CHECK_THAT(msgs[0], Contains("thread (1, 0, 0)") && Contains("destination shared address 24 "));
}

// ---- planted bug 5: a read before cp.async.wait_group -----------------------------------------
// Two groups in flight; the thread waits for all but one (wait_group 1) and reads both tiles.
__global__ void read_before_wait_kernel(const simt::bf16* src, float* out) {
  TORCH_MLA_DYNAMIC_SMEM(smem);
  const int lane = threadIdx.x;
  const uint32_t s = smem_addr(smem);
  cp_async_16(s + lane * 16, src + lane * 8, true);
  cp_async_commit();
  cp_async_16(s + 512 + lane * 16, src + 256 + lane * 8, true);
  cp_async_commit();
  cp_async_wait<1>();  // BUG: the second group may still be in flight
  __syncwarp();
  const float2 a = unpack2<simt::bf16>(load_shared(reinterpret_cast<const uint32_t*>(smem + lane * 16)));
  const float2 b = unpack2<simt::bf16>(load_shared(reinterpret_cast<const uint32_t*>(smem + 512 + lane * 16)));
  global_ref(&out[lane]) = a.x + b.x;
}

// The destination holds NaN between issue and wait: a plain (unchecked) read sees it.
__global__ void nan_before_wait_kernel(const simt::bf16* src, float* out) {
  TORCH_MLA_DYNAMIC_SMEM(smem);
  const int lane = threadIdx.x;
  cp_async_16(smem_addr(smem) + lane * 16, src + lane * 8, true);
  cp_async_commit();
  uint32_t raw;
  std::memcpy(&raw, smem + lane * 16, 4);  // not through the primitives: no check, but NaN
  global_ref(&out[2 * lane]) = unpack2<simt::bf16>(raw).x;
  cp_async_wait<0>();
  std::memcpy(&raw, smem + lane * 16, 4);
  global_ref(&out[2 * lane + 1]) = unpack2<simt::bf16>(raw).x;
}

TEST_CASE("planted bug: a read before cp.async.wait_group", "[simt][checks]") {
  std::vector<simt::bf16> src(512, simt::bf16(1.f));
  std::vector<float> out(64);
  for (const auto& msg : errors_in_every_order([&](simt::Stream& s) {
         s.register_memory(src.data(), src.size() * 2, "src");
         s.register_memory(out.data(), out.size() * 4, "out");
         simt::launch<read_before_wait_kernel>(&s, 1, 32, 1024, src.data(), out.data());
       })) {
    CHECK_THAT(msg, Contains("simt: read before cp.async.wait_group in kernel") && Contains("read_before_wait_kernel") &&
                        Contains("block (0, 0, 0)") && Contains("has not landed"));
  }
  for (simt::Order order : kOrders) {
    simt::Stream s = make_stream(order);
    s.register_memory(src.data(), src.size() * 2, "src");
    s.register_memory(out.data(), out.size() * 4, "out");
    simt::launch<nan_before_wait_kernel>(&s, 1, 32, 512, src.data(), out.data());
    for (int lane = 0; lane < 32; ++lane) {
      REQUIRE(std::isnan(out[2 * lane]));
      REQUIRE(out[2 * lane + 1] == 1.f);
    }
  }
}

// ---- the other checks -------------------------------------------------------------------------
__global__ void touch_smem_kernel(int offset) {
  TORCH_MLA_DYNAMIC_SMEM(smem);
  if (threadIdx.x == 0) store_shared(reinterpret_cast<float*>(smem + offset), 1.f);
}

TEST_CASE("dynamic shared memory above the declared size or the device limit or the launch size", "[simt][checks]") {
  simt::Stream s;
  // 64 KiB without cudaFuncSetAttribute (48 KiB by default).
  CHECK_THROWS_WITH(simt::launch<touch_smem_kernel>(&s, 1, 32, 64 * 1024, 0),
                    Contains("dynamic shared memory above the kernel's declared size") && Contains("touch_smem_kernel") &&
                        Contains("65536 bytes requested, 49152 declared"));
  CHECK_THROWS_WITH(simt::launch<touch_smem_kernel>(&s, 1, 32, 228 * 1024, 0),
                    Contains("dynamic shared memory above the device maximum"));
  CHECK_THROWS_WITH(simt::func_set_max_dynamic_smem(reinterpret_cast<const void*>(&touch_smem_kernel), 228 * 1024),
                    Contains("above the device's 232448 bytes"));
  // launch_kernel opts in to its size first, as on the GPU.
  launch_kernel<touch_smem_kernel>(1, 32, 64 * 1024, &s, 0);
  // An access past the launch's dynamic shared memory.
  CHECK_THROWS_WITH(launch_kernel<touch_smem_kernel>(1, 32, 1024, &s, 1022),
                    Contains("shared memory out of bounds in kernel") && Contains("thread (0, 0, 0)"));
}

__global__ void misaligned_vector_kernel(const simt::bf16* p) { (void)load_global(reinterpret_cast<const uint4*>(p + 4)); }

__global__ void unwritten_shared_kernel(float* out) {
  TORCH_MLA_DYNAMIC_SMEM(smem);
  global_ref(&out[threadIdx.x]) = load_shared(reinterpret_cast<const float*>(smem) + threadIdx.x);
}

__global__ void divergent_shfl_kernel(float* out) {
  float v = 1.f;
  if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);  // lanes 16.. never join
  global_ref(&out[threadIdx.x]) = v;
}

__global__ void assert_kernel(int n) { CUDA_KERNEL_ASSERT(static_cast<int>(threadIdx.x) < n); }

TEST_CASE("misaligned 16-byte accesses and unwritten shared memory and warp divergence and device asserts", "[simt][checks]") {
  std::vector<simt::bf16> src(64);
  std::vector<float> out(32);
  simt::Stream s;
  s.register_memory(src.data(), src.size() * 2, "src");
  s.register_memory(out.data(), out.size() * 4, "out");
  CHECK_THROWS_WITH(simt::launch<misaligned_vector_kernel>(&s, 1, 32, 0, src.data()),
                    Contains("misaligned global access") && Contains("is not 16-byte aligned"));
  CHECK_THROWS_WITH(simt::launch<unwritten_shared_kernel>(&s, 1, 32, 128, out.data()),
                    Contains("read of uninitialised shared memory"));
  CHECK_THROWS_WITH(simt::launch<divergent_shfl_kernel>(&s, 1, 32, 0, out.data()),
                    Contains("deadlock: warp collective not reached by every lane") &&
                        Contains("16 threads (16..31) exited"));
  CHECK_THROWS_WITH(simt::launch<assert_kernel>(&s, 1, 64, 0, 40),
                    Contains("device assertion failed in kernel") && Contains("thread (40, 0, 0)") &&
                        Contains("static_cast<int>(threadIdx.x) < n"));
  // Memory not registered at all.
  simt::Stream bare;
  CHECK_THROWS_WITH(simt::launch<oob_load_kernel>(&bare, 1, 32, 0, out.data(), 32, out.data()),
                    Contains("out-of-bounds global read") && Contains("lies outside every tensor registered"));
}

}  // namespace
