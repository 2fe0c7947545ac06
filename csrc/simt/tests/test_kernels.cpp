// Our CUDA kernels (csrc/torch_mla/cores/cuda, compiled as host C++ under TORCH_MLA_SIMT) run on the
// emulator on host arrays, against a float64 reference, by FlashAttention's rule: the kernel's
// largest error is at most 2× (forward) / 3× (gradients) that of a naive low-precision
// implementation (T-rounded matmul outputs, float accumulation). No torch: the launchers are
// called as cores/cuda/cuda_core.cu calls them, with MlaParams filled the same way.
//
// Every tensor lives in a buffer whose memory past its logical end is NaN and not registered for
// the launch (a read there fails the launch); non-contiguous inputs have NaN gaps between rows
// and heads. The atomic and the deterministic backward both run, the atomic one in both grid
// orders (cores/cuda/grid_order.h); the forward and the deterministic backward twice, in two lane
// orders and the two grid orders, and must agree bit for bit.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "simt/simt.h"
#include "torch_mla/cores/cuda/mla_params.h"

namespace {

using torch_mla::cuda::GridOrder;
using torch_mla::cuda::MlaParams;

// ---- buffers with NaN past their logical end -------------------------------------------------
template <typename E>
E nan_value() {
  if constexpr (std::is_same_v<E, float>) {
    return std::numeric_limits<float>::quiet_NaN();
  } else {
    return E::from_bits(0x7fff);
  }
}

template <typename E>
class Poisoned {
 public:
  static constexpr size_t kPad = 256;  // elements of NaN past the end
  explicit Poisoned(size_t extent) : extent_(extent) {
    const size_t bytes = ((extent + kPad) * sizeof(E) + 63) / 64 * 64;
    data_.reset(static_cast<E*>(std::aligned_alloc(64, bytes)));
    std::fill(data_.get(), data_.get() + extent + kPad, nan_value<E>());
  }
  E* data() const { return data_.get(); }
  size_t extent() const { return extent_; }
  size_t bytes() const { return extent_ * sizeof(E); }
  E& operator[](size_t i) { return data_.get()[i]; }
  const E& operator[](size_t i) const { return data_.get()[i]; }
  void zero() { std::fill(data_.get(), data_.get() + extent_, E(0.f)); }

 private:
  struct Free {
    void operator()(E* p) const { std::free(p); }
  };
  std::unique_ptr<E, Free> data_;
  size_t extent_;
};

// A (T, H, D) or (T, D) tensor view into a Poisoned buffer.
template <typename E>
struct Tensor3 {
  int64_t rows, heads, dim, row_stride, head_stride;
  Poisoned<E> buf;
  Tensor3(int64_t t, int64_t h, int64_t d, int64_t rs, int64_t hs)
      : rows(t), heads(h), dim(d), row_stride(rs), head_stride(hs),
        buf(static_cast<size_t>(t > 0 ? (t - 1) * rs + (h - 1) * hs + d : 0)) {}
  E& at(int64_t t, int64_t h, int64_t d) { return buf[t * row_stride + h * head_stride + d]; }
  const E& at(int64_t t, int64_t h, int64_t d) const { return buf[t * row_stride + h * head_stride + d]; }
};

template <typename E>
Tensor3<E> make_tensor(int64_t t, int64_t h, int64_t d, bool strided) {
  // Strided: 8 elements (16 bytes) of NaN after every head and every row.
  const int64_t hs = strided ? d + 8 : d;
  const int64_t rs = strided ? h * hs + 8 : h * hs;
  return Tensor3<E>(t, h, d, rs, hs);
}

template <typename T>
double round_to(double x) {
  return static_cast<float>(T(static_cast<float>(x)));
}

// ---- the problem -----------------------------------------------------------------------------
struct Problem {
  int dim_qk, dim_v, dim_rope, heads;
  bool causal;
  bool packed;
  std::vector<int> lens;  // per sequence (padded: all equal)
  bool strided;
  uint64_t seed;
  int max_seqlen = 0;     // > longest: the grid of a caller-given max_seqlen
  float input_std = 1.f;  // of q, kv, k_rope, grad_out

  int dim_nope() const { return dim_qk - dim_rope; }
  int64_t tokens() const {
    int64_t t = 0;
    for (int l : lens) t += l;
    return t;
  }
  std::string describe() const {
    std::ostringstream os;
    os << "(" << dim_qk << ", " << dim_v << ") Dr=" << dim_rope << " H=" << heads << (causal ? " causal" : " non-causal")
       << (packed ? " packed" : " padded") << (strided ? " strided" : "") << " lens";
    for (int l : lens) os << " " << l;
    if (max_seqlen > 0) os << " max_seqlen " << max_seqlen;
    os << " std " << input_std << " seed " << seed;
    return os.str();
  }
};

// Float64 (exact) or naive low-precision attention of one (sequence, head): inputs in double,
// already T-rounded. Low precision: matmul outputs rounded to T, softmax in float.
struct HeadRef {
  std::vector<double> out, lse, dq, dk, dv;  // dk: len × dim_qk
};

template <typename T>
HeadRef reference_head(int len, int dqk, int dv, double scale, bool causal, const std::vector<double>& q,
                       const std::vector<double>& k, const std::vector<double>& v, const std::vector<double>& d_o,
                       bool lowp) {
  auto r = [lowp](double x) { return lowp ? round_to<T>(x) : x; };
  auto acc = [lowp](double x) { return lowp ? static_cast<double>(static_cast<float>(x)) : x; };
  HeadRef h;
  std::vector<double> P(static_cast<size_t>(len) * len, 0.0);
  h.lse.assign(len, 0.0);
  h.out.assign(static_cast<size_t>(len) * dv, 0.0);
  for (int i = 0; i < len; ++i) {
    std::vector<double> s(len, -INFINITY);
    double mx = -INFINITY;
    for (int j = 0; j < len; ++j) {
      if (causal && j > i) continue;
      double dot = 0;
      for (int d = 0; d < dqk; ++d) dot = acc(dot + q[i * dqk + d] * k[j * dqk + d]);
      s[j] = r(scale * dot);
      mx = std::max(mx, s[j]);
    }
    double sum = 0;
    for (int j = 0; j < len; ++j) sum = acc(sum + (s[j] == -INFINITY ? 0.0 : std::exp(s[j] - mx)));
    h.lse[i] = mx + std::log(sum);
    for (int j = 0; j < len; ++j) P[i * len + j] = s[j] == -INFINITY ? 0.0 : r(std::exp(s[j] - mx) / sum);
    for (int d = 0; d < dv; ++d) {
      double o = 0;
      for (int j = 0; j < len; ++j) o = acc(o + P[i * len + j] * v[j * dv + d]);
      h.out[i * dv + d] = r(o);
    }
  }
  // Backward.
  std::vector<double> dS(static_cast<size_t>(len) * len, 0.0);
  for (int i = 0; i < len; ++i) {
    std::vector<double> dP(len, 0.0);
    double delta = 0;
    for (int j = 0; j < len; ++j) {
      double x = 0;
      for (int d = 0; d < dv; ++d) x = acc(x + d_o[i * dv + d] * v[j * dv + d]);
      dP[j] = r(x);
      delta = acc(delta + dP[j] * P[i * len + j]);
    }
    for (int j = 0; j < len; ++j) dS[i * len + j] = r(P[i * len + j] * (dP[j] - delta));
  }
  h.dq.assign(static_cast<size_t>(len) * dqk, 0.0);
  h.dk.assign(static_cast<size_t>(len) * dqk, 0.0);
  h.dv.assign(static_cast<size_t>(len) * dv, 0.0);
  for (int i = 0; i < len; ++i) {
    for (int d = 0; d < dqk; ++d) {
      double x = 0;
      for (int j = 0; j < len; ++j) x = acc(x + dS[i * len + j] * k[j * dqk + d]);
      h.dq[i * dqk + d] = r(scale * x);
    }
  }
  for (int j = 0; j < len; ++j) {
    for (int d = 0; d < dqk; ++d) {
      double x = 0;
      for (int i = 0; i < len; ++i) x = acc(x + dS[i * len + j] * q[i * dqk + d]);
      h.dk[j * dqk + d] = r(scale * x);
    }
    for (int d = 0; d < dv; ++d) {
      double x = 0;
      for (int i = 0; i < len; ++i) x = acc(x + P[i * len + j] * d_o[i * dv + d]);
      h.dv[j * dv + d] = r(x);
    }
  }
  return h;
}

// Whole-problem results, contiguous: out (T, H, Dv), lse (T, H), dq (T, H, Dqk),
// dkv (T, H, Dn + Dv), dk_rope (T, Dr).
struct Results {
  std::vector<double> out, lse, dq, dkv, dk_rope;
};

template <typename T>
Results reference(const Problem& pb, double scale, const Tensor3<T>& q, const Tensor3<T>& kv,
                  const Tensor3<T>& kr, const Tensor3<T>& d_o, bool lowp) {
  const int64_t Tn = pb.tokens();
  const int H = pb.heads, dqk = pb.dim_qk, dv = pb.dim_v, dn = pb.dim_nope(), drp = pb.dim_rope;
  Results res;
  res.out.assign(Tn * H * dv, 0.0);
  res.lse.assign(Tn * H, 0.0);
  res.dq.assign(Tn * H * dqk, 0.0);
  res.dkv.assign(Tn * H * (dn + dv), 0.0);
  res.dk_rope.assign(Tn * drp, 0.0);
  auto f = [](const T& x) { return static_cast<double>(static_cast<float>(x)); };
  int64_t begin = 0;
  for (int len : pb.lens) {
    for (int h = 0; h < H; ++h) {
      std::vector<double> qh(static_cast<size_t>(len) * dqk), kh(static_cast<size_t>(len) * dqk),
          vh(static_cast<size_t>(len) * dv), doh(static_cast<size_t>(len) * dv);
      for (int i = 0; i < len; ++i) {
        const int64_t t = begin + i;
        for (int d = 0; d < dqk; ++d) qh[i * dqk + d] = f(q.at(t, h, d));
        for (int d = 0; d < dn; ++d) kh[i * dqk + d] = f(kv.at(t, h, d));
        for (int d = 0; d < drp; ++d) kh[i * dqk + dn + d] = f(kr.at(t, 0, d));
        for (int d = 0; d < dv; ++d) vh[i * dv + d] = f(kv.at(t, h, dn + d));
        for (int d = 0; d < dv; ++d) doh[i * dv + d] = f(d_o.at(t, h, d));
      }
      const HeadRef r = reference_head<T>(len, dqk, dv, scale, pb.causal, qh, kh, vh, doh, lowp);
      for (int i = 0; i < len; ++i) {
        const int64_t t = begin + i;
        res.lse[t * H + h] = r.lse[i];
        for (int d = 0; d < dv; ++d) res.out[(t * H + h) * dv + d] = r.out[i * dv + d];
        for (int d = 0; d < dqk; ++d) res.dq[(t * H + h) * dqk + d] = r.dq[i * dqk + d];
        for (int d = 0; d < dn; ++d) res.dkv[(t * H + h) * (dn + dv) + d] = r.dk[i * dqk + d];
        for (int d = 0; d < dv; ++d) res.dkv[(t * H + h) * (dn + dv) + dn + d] = r.dv[i * dv + d];
        for (int d = 0; d < drp; ++d) res.dk_rope[t * drp + d] += r.dk[i * dqk + dn + d];
      }
    }
    begin += len;
  }
  if (lowp) {
    for (double& x : res.dk_rope) x = round_to<T>(x);
  }
  return res;
}

double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::abs(a[i] - b[i]);
    if (std::isnan(d)) return INFINITY;
    m = std::max(m, d);
  }
  return m;
}

struct Tolerance {
  double factor;
  double floor;
};

void compare(const char* what, const std::vector<double>& got, const std::vector<double>& exact,
             const std::vector<double>& naive, Tolerance tol) {
  const double err = max_abs_diff(got, exact), naive_err = max_abs_diff(naive, exact);
  size_t nans = 0;
  for (double x : got) nans += std::isnan(x) ? 1 : 0;
  INFO(what << ": kernel error " << err << ", naive low-precision error " << naive_err << ", NaNs " << nans
            << " of " << got.size());
  CHECK(nans == 0);
  CHECK(err <= tol.factor * naive_err + tol.floor);
}

// ---- running the kernels ---------------------------------------------------------------------
template <typename T, int kDimQK, int kDimV>
struct Runner {
  const Problem& pb;
  int64_t Tn;
  double scale;
  Tensor3<T> q, kv, kr, d_o;
  std::vector<int32_t> cu;

  explicit Runner(const Problem& p)
      : pb(p), Tn(p.tokens()), scale(1.0 / std::sqrt(static_cast<double>(kDimQK))),
        q(make_tensor<T>(Tn, p.heads, kDimQK, p.strided)),
        kv(make_tensor<T>(Tn, p.heads, p.dim_nope() + kDimV, p.strided)),
        kr(make_tensor<T>(Tn, 1, p.dim_rope, p.strided)),
        d_o(make_tensor<T>(Tn, p.heads, kDimV, p.strided)) {
    std::mt19937_64 rng(p.seed);
    std::normal_distribution<float> dist(0.f, p.input_std);
    auto fill = [&](Tensor3<T>& x) {
      for (int64_t t = 0; t < x.rows; ++t)
        for (int64_t h = 0; h < x.heads; ++h)
          for (int64_t d = 0; d < x.dim; ++d) x.at(t, h, d) = T(dist(rng));
    };
    fill(q);
    fill(kv);
    fill(kr);
    fill(d_o);
    cu.push_back(0);
    for (int l : p.lens) cu.push_back(cu.back() + l);
  }

  MlaParams params() const {
    MlaParams p;
    p.tokens = Tn;
    p.batch = static_cast<int>(pb.lens.size());
    p.seqlen = pb.packed ? 0 : pb.lens[0];
    p.max_seqlen = std::max(pb.max_seqlen, *std::max_element(pb.lens.begin(), pb.lens.end()));
    p.heads = pb.heads;
    p.dim_nope = pb.dim_nope();
    p.dim_rope = pb.dim_rope;
    p.cu_seqlens = pb.packed ? cu.data() : nullptr;
    p.softmax_scale = static_cast<float>(scale);
    p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
    p.causal = pb.causal;
    p.q = q.buf.data();
    p.q_row_stride = q.row_stride;
    p.q_head_stride = q.head_stride;
    p.kv = kv.buf.data();
    p.kv_row_stride = kv.row_stride;
    p.kv_head_stride = kv.head_stride;
    p.k_rope = kr.buf.data();
    p.k_rope_row_stride = kr.row_stride;
    return p;
  }

  static simt::Stream stream(simt::Order order, uint64_t seed) {
    simt::Stream s;
    s.order = order;
    s.seed = seed;
    return s;
  }

  void register_inputs(simt::Stream& s) const {
    s.register_memory(q.buf.data(), q.buf.bytes(), "q");
    s.register_memory(kv.buf.data(), kv.buf.bytes(), "kv");
    s.register_memory(kr.buf.data(), kr.buf.bytes(), "k_rope");
    s.register_memory(cu.data(), cu.size() * 4, "cu_seqlens");
  }

  struct Forward {
    Tensor3<T> out;
    Poisoned<float> lse;
  };

  Forward forward(simt::Order order, uint64_t seed, GridOrder grid) const {
    Forward f{make_tensor<T>(Tn, pb.heads, kDimV, pb.strided), Poisoned<float>(Tn * pb.heads)};
    simt::Stream s = stream(order, seed);
    register_inputs(s);
    s.register_memory(f.out.buf.data(), f.out.buf.bytes(), "out");
    s.register_memory(f.lse.data(), f.lse.bytes(), "lse");
    MlaParams p = params();
    p.out = f.out.buf.data();
    p.out_row_stride = f.out.row_stride;
    p.out_head_stride = f.out.head_stride;
    p.lse = f.lse.data();
    p.grid_order = grid;
    torch_mla::cuda::run_mla_forward<T, kDimQK, kDimV>(p, &s);
    return f;
  }

  struct Backward {
    std::vector<double> dq, dkv, dk_rope;  // as the op returns them: rounded to T
  };

  Backward backward(const Forward& fwd, bool deterministic, simt::Order order, uint64_t seed,
                    GridOrder grid) const {
    const int H = pb.heads, dn = pb.dim_nope();
    Poisoned<float> row_stats(2 * H * Tn);  // lse·log2(e) and delta, (2, H, T)
    Poisoned<float> dq_accum(deterministic ? 0 : Tn * H * kDimQK);
    Tensor3<T> dq = make_tensor<T>(deterministic ? Tn : 0, H, kDimQK, false);
    Poisoned<float> dk_rope_accum(Tn * pb.dim_rope);
    Tensor3<T> dkv = make_tensor<T>(Tn, H, dn + kDimV, false);
    if (!deterministic) dq_accum.zero();
    dk_rope_accum.zero();

    simt::Stream s = stream(order, seed);
    register_inputs(s);
    s.register_memory(fwd.out.buf.data(), fwd.out.buf.bytes(), "out");
    s.register_memory(fwd.lse.data(), fwd.lse.bytes(), "lse");
    s.register_memory(d_o.buf.data(), d_o.buf.bytes(), "grad_out");
    s.register_memory(row_stats.data(), row_stats.bytes(), "row_stats");
    if (!deterministic) s.register_memory(dq_accum.data(), dq_accum.bytes(), "dq_accum");
    if (deterministic) s.register_memory(dq.buf.data(), dq.buf.bytes(), "dq");
    s.register_memory(dk_rope_accum.data(), dk_rope_accum.bytes(), "dk_rope_accum");
    s.register_memory(dkv.buf.data(), dkv.buf.bytes(), "dkv");

    MlaParams p = params();
    p.out = fwd.out.buf.data();
    p.out_row_stride = fwd.out.row_stride;
    p.out_head_stride = fwd.out.head_stride;
    p.lse = fwd.lse.data();
    p.grad_out = d_o.buf.data();
    p.do_row_stride = d_o.row_stride;
    p.do_head_stride = d_o.head_stride;
    p.lse_log2 = row_stats.data();
    p.delta = row_stats.data() + H * Tn;
    p.dq_accum = deterministic ? nullptr : dq_accum.data();
    p.dq = deterministic ? dq.buf.data() : nullptr;
    p.dkv = dkv.buf.data();
    p.dk_rope_accum = dk_rope_accum.data();
    p.grid_order = grid;
    torch_mla::cuda::run_mla_backward_preprocess<T>(p, kDimV, &s);
    torch_mla::cuda::run_mla_backward<T, kDimQK, kDimV>(p, deterministic, &s);

    Backward b;
    auto f = [](const T& x) { return static_cast<double>(static_cast<float>(x)); };
    auto rt = [](float x) { return static_cast<double>(static_cast<float>(T(x))); };
    b.dq.resize(Tn * H * kDimQK);
    for (int64_t i = 0; i < Tn * H * kDimQK; ++i) b.dq[i] = deterministic ? f(dq.buf[i]) : rt(dq_accum[i]);
    b.dkv.resize(Tn * H * (dn + kDimV));
    for (int64_t i = 0; i < Tn * H * (dn + kDimV); ++i) b.dkv[i] = f(dkv.buf[i]);
    b.dk_rope.resize(Tn * pb.dim_rope);
    for (int64_t i = 0; i < Tn * pb.dim_rope; ++i) b.dk_rope[i] = rt(dk_rope_accum[i]);
    return b;
  }
};

// SIMT_KERNEL_ORDERS=all runs every problem in every lane order (CI: one order per problem,
// alternating forward / random; the deterministic backward always runs in a second order too).
bool all_orders() {
  const char* env = std::getenv("SIMT_KERNEL_ORDERS");
  return env != nullptr && std::string(env) == "all";
}

template <typename T, int kDimQK, int kDimV>
void check_problem_in(const Problem& pb, simt::Order order);

template <typename T, int kDimQK, int kDimV>
void check_problem(const Problem& pb, simt::Order order) {
  if (!all_orders()) return check_problem_in<T, kDimQK, kDimV>(pb, order);
  for (simt::Order o : {simt::Order::forward, simt::Order::reverse, simt::Order::random}) {
    check_problem_in<T, kDimQK, kDimV>(pb, o);
  }
}

template <typename T, int kDimQK, int kDimV>
void check_problem_in(const Problem& pb, simt::Order order) {
  INFO(pb.describe() << ", lane order " << simt::to_string(order));
  Runner<T, kDimQK, kDimV> run(pb);
  const Results exact = reference<T>(pb, run.scale, run.q, run.kv, run.kr, run.d_o, false);
  const Results naive = reference<T>(pb, run.scale, run.q, run.kv, run.kr, run.d_o, true);

  // The problem in one grid order and lane order, then again in the other grid order (and another
  // lane order): the CTAs then run in another sequence, which must change no bit of what has no
  // atomics, and keep the atomic backward within the rule.
  constexpr GridOrder grid = GridOrder::query_fastest, other_grid = GridOrder::head_fastest;
  const auto fwd = run.forward(order, pb.seed, grid);
  const int64_t Tn = run.Tn;
  std::vector<double> out(Tn * pb.heads * kDimV), lse(Tn * pb.heads);
  for (int64_t t = 0; t < Tn; ++t)
    for (int h = 0; h < pb.heads; ++h)
      for (int d = 0; d < kDimV; ++d) out[(t * pb.heads + h) * kDimV + d] = static_cast<float>(fwd.out.at(t, h, d));
  for (size_t i = 0; i < lse.size(); ++i) lse[i] = fwd.lse[i];
  compare("out", out, exact.out, naive.out, {2, 1e-6});
  compare("lse", lse, exact.lse, naive.lse, {2, 1e-5});
  // The forward has no atomics: bitwise the same in another lane order and grid order.
  const simt::Order other = order == simt::Order::reverse ? simt::Order::random : simt::Order::reverse;
  {
    const auto fwd2 = run.forward(other, pb.seed + 1, other_grid);
    CHECK(std::memcmp(fwd2.out.buf.data(), fwd.out.buf.data(), fwd.out.buf.bytes()) == 0);
    CHECK(std::memcmp(fwd2.lse.data(), fwd.lse.data(), fwd.lse.bytes()) == 0);
  }

  const Tolerance grad{3, 1e-6};
  for (GridOrder g : {grid, other_grid}) {
    INFO("grid order " << torch_mla::cuda::grid_order_name(g));
    const auto atomic = run.backward(fwd, false, order, pb.seed, g);
    compare("dq (atomic)", atomic.dq, exact.dq, naive.dq, grad);
    compare("dkv (atomic)", atomic.dkv, exact.dkv, naive.dkv, grad);
    compare("dk_rope (atomic)", atomic.dk_rope, exact.dk_rope, naive.dk_rope, grad);
  }

  const auto det = run.backward(fwd, true, order, pb.seed, grid);
  compare("dq (deterministic)", det.dq, exact.dq, naive.dq, grad);
  compare("dkv (deterministic)", det.dkv, exact.dkv, naive.dkv, grad);
  compare("dk_rope (deterministic)", det.dk_rope, exact.dk_rope, naive.dk_rope, grad);
  // Bitwise the same in another lane order and grid order.
  const auto det2 = run.backward(fwd, true, other, pb.seed + 1, other_grid);
  CHECK(det2.dq == det.dq);
  CHECK(det2.dkv == det.dkv);
  CHECK(det2.dk_rope == det.dk_rope);
}

// The dims of the two tuned shapes: (192, 128) with Dr = 64 (DeepSeek-V2/V3), (96, 64) with Dr = 32.
template <typename T, int kDimQK, int kDimV>
void run_matrix(bool packed, const std::vector<int>& heads) {
  constexpr int kDimRope = kDimQK == 192 ? 64 : 32;
  uint64_t seed = 1000 * kDimQK + (packed ? 100 : 0) + (std::is_same_v<T, simt::bf16> ? 0 : 50);
  int i = 0;
  for (int h : heads) {
    for (bool causal : {true, false}) {
      Problem pb{kDimQK, kDimV, kDimRope, h, causal, packed, {}, i % 2 == 1, seed++};
      if (packed) {
        pb.lens = (i % 2 == 0) ? std::vector<int>{65, 0, 1, 128, 63} : std::vector<int>{1, 129, 0, 64, 127};
      } else {
        pb.lens = (i % 2 == 0) ? std::vector<int>{129, 129} : std::vector<int>{64, 64, 64};
      }
      check_problem<T, kDimQK, kDimV>(pb, i % 2 == 0 ? simt::Order::forward : simt::Order::random);
      ++i;
    }
  }
}

TEST_CASE("kernels (192 128) bf16 padded", "[kernels]") { run_matrix<simt::bf16, 192, 128>(false, {1, 2, 3}); }
TEST_CASE("kernels (192 128) bf16 packed", "[kernels]") { run_matrix<simt::bf16, 192, 128>(true, {1, 2, 3}); }
TEST_CASE("kernels (192 128) fp16 padded", "[kernels]") { run_matrix<simt::f16, 192, 128>(false, {1, 2, 3}); }
TEST_CASE("kernels (192 128) fp16 packed", "[kernels]") { run_matrix<simt::f16, 192, 128>(true, {1, 2, 3}); }
TEST_CASE("kernels (96 64) bf16 padded", "[kernels]") { run_matrix<simt::bf16, 96, 64>(false, {2}); }
TEST_CASE("kernels (96 64) bf16 packed", "[kernels]") { run_matrix<simt::bf16, 96, 64>(true, {2}); }
TEST_CASE("kernels (96 64) fp16 padded", "[kernels]") { run_matrix<simt::f16, 96, 64>(false, {2}); }
TEST_CASE("kernels (96 64) fp16 packed", "[kernels]") { run_matrix<simt::f16, 96, 64>(true, {2}); }

// Splits of Dn + Dr other than the models' (any multiple of 8 takes the tuned kernels), larger
// scores, and a grid sized by a caller's max_seqlen above the longest sequence.
TEST_CASE("kernels other rope splits and larger scores", "[kernels]") {
  {
    Problem pb{192, 128, 56, 2, true, true, {1, 77, 0, 130}, true, 31};
    pb.max_seqlen = 200;
    check_problem<simt::bf16, 192, 128>(pb, simt::Order::reverse);
  }
  {
    Problem pb{96, 64, 8, 3, false, true, {40, 0, 97}, false, 32};
    pb.input_std = 3.f;
    check_problem<simt::f16, 96, 64>(pb, simt::Order::random);
  }
  {
    Problem pb{192, 128, 64, 2, true, false, {100, 100}, true, 33};
    pb.input_std = 2.5f;
    check_problem<simt::bf16, 192, 128>(pb, simt::Order::forward);
  }
}

// The grid's index math (mla_params.h grid_coords): each order a bijection from [0, blocks·batch·
// inner) onto the (block, sequence, inner) triples, with the fastest-varying index its name says;
// and at the 1-D grid's limit (2^31 - 1 CTAs), where 32-bit arithmetic would overflow.
TEST_CASE("grid orders cover every CTA once, in their order", "[kernels][grid]") {
  using torch_mla::cuda::grid_coords;
  const int blocks = 3, batch = 2, inner = 5;
  for (GridOrder order : {GridOrder::query_fastest, GridOrder::head_fastest}) {
    INFO(torch_mla::cuda::grid_order_name(order));
    std::vector<int> seen(blocks * batch * inner, 0);
    for (int64_t idx = 0; idx < blocks * batch * inner; ++idx) {
      const auto c = grid_coords(order, idx, blocks, batch, inner);
      REQUIRE((c.block >= 0 && c.block < blocks && c.seq >= 0 && c.seq < batch && c.inner >= 0 && c.inner < inner));
      ++seen[(c.seq * inner + c.inner) * blocks + c.block];
      if (idx == 0) continue;
      const auto prev = grid_coords(order, idx - 1, blocks, batch, inner);
      if (order == GridOrder::query_fastest && idx % blocks != 0) {
        // Neighbours are the next block of the same (head, sequence): they read the same K/V.
        CHECK((c.block == prev.block + 1 && c.seq == prev.seq && c.inner == prev.inner));
      } else if (order == GridOrder::head_fastest && idx % inner != 0) {
        CHECK((c.inner == prev.inner + 1 && c.seq == prev.seq && c.block == prev.block));
      }
    }
    CHECK(std::all_of(seen.begin(), seen.end(), [](int n) { return n == 1; }));
  }
  // The largest index of a 1-D grid, 2^31 - 1: the last CTA of 2^14 blocks × 2^10 sequences × 2^7
  // heads; then an index of 31 bits whose coordinates are easy to state.
  const int64_t last = (int64_t{1} << 31) - 1;
  for (GridOrder order : {GridOrder::query_fastest, GridOrder::head_fastest}) {
    const auto c = grid_coords(order, last, 1 << 14, 1 << 10, 1 << 7);
    CHECK((c.block == (1 << 14) - 1 && c.seq == (1 << 10) - 1 && c.inner == (1 << 7) - 1));
  }
  const auto q = grid_coords(GridOrder::query_fastest, (int64_t{1} << 30) + 5, 1 << 14, 1 << 10, 1 << 7);
  CHECK((q.block == 5 && q.seq == 1 << 9 && q.inner == 0));
  const auto h = grid_coords(GridOrder::head_fastest, (int64_t{1} << 30) + 5, 1 << 14, 1 << 10, 1 << 7);
  CHECK((h.block == 1 << 13 && h.seq == 0 && h.inner == 5));
}

// A small problem for a quick first look (and for timing one launch of each kernel).
TEST_CASE("kernels smoke (192 128) bf16", "[kernels][smoke]") {
  Problem pb{192, 128, 64, 1, true, false, {65}, false, 7};
  check_problem<simt::bf16, 192, 128>(pb, simt::Order::forward);
}

}  // namespace
