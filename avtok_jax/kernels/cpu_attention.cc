// Fused multi-head attention for XLA:CPU, forward and backward, as XLA FFI
// handlers (avtok_jax/kernels/cpu_attention.py builds, registers and calls them).
//
// Why: XLA:CPU has no fused attention. It runs softmax(q k^T) v as separate
// batched matmuls (each on one core) with the [B, heads, L, L] scores going
// through memory between them; on the small preset that made attention ~22 ms
// of each tokenizer block's forward+backward against ~11 ms for PyTorch's
// fused CPU kernel (bench/README.md). Here each (batch, head) pair is one work
// item handled start to finish by one thread of XLA's intra-op pool, with the
// scores of a block of query rows kept in a thread-local buffer.
//
// The maths (FlashAttention's forward and backward, Dao et al. 2022, with the
// whole key range of a query block in the buffer instead of online softmax):
//   S = scale * Q K^T, P = softmax(S) (causal: key j <= query i, top-left
//   aligned as jax.nn.dot_product_attention), O = P V, lse = logsumexp(S);
//   backward: P = exp(S - lse), dV = P^T dO, dP = dO V^T,
//   dS = P * (dP - rowsum(dO * O)), dQ = scale * dS K, dK = scale * dS^T Q.
//
// Layout: q, k, v, o and their gradients are [..., L, heads, d] row-major
// float32 (all leading dims flattened into one batch), lse is [..., heads, Lq].
// The small matmuls use one register-tiled kernel (6 rows x 16 columns of
// 8-lane vectors via GCC vector extensions, so the compiler picks AVX2/AVX-512
// or SSE from -march). Deterministic: every output element is written by one
// thread in a fixed order.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }

inline v8f splat(float x) { return v8f{x, x, x, x, x, x, x, x}; }

inline float hsum(v8f v) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

inline float hmax(v8f v) {
  float m = v[0];
  for (int i = 1; i < 8; ++i) m = std::max(m, v[i]);
  return m;
}

// exp(x) for x <= 0 (scores minus their row maximum): Cody-Waite reduction
// x = n ln2 + r, |r| <= ln2 / 2, then the degree-6 polynomial of Cephes'
// expf (S. L. Moshier); relative error ~1e-7. Inputs below -87.3 are clamped
// (exp(-87.3) ~ 1e-38, the smallest normal float's order of magnitude).
inline v8f exp8(v8f x) {
  const v8f lo = splat(-87.3f);
  x = x < lo ? lo : x;
  // Round x / ln2 to the nearest integer with the 1.5 * 2^23 trick.
  const v8f magic = splat(12582912.0f);
  v8f n = (x * splat(1.44269504088896341f) + magic) - magic;
  v8f r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
  v8f p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;  // 2^n
  v8f scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float exp1(float x) {
  return exp8(splat(x))[0];
}

// C[MR x 8*NV] (+)= A[MR x K] B[K x 8*NV] for one register tile.
template <int MR, int NV>
inline void tile(int64_t K, const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb,
                 float* c, int64_t ldc, bool accumulate) {
  v8f acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = splat(0.0f);
  for (int64_t k = 0; k < K; ++k) {
    v8f bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = load8(b + k * ldb + 8 * v);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const v8f s = splat(a[i * ars + k * acs]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] += s * bv[v];
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* p = c + i * ldc + 8 * v;
      store8(p, accumulate ? acc[i][v] + load8(p) : acc[i][v]);
    }
}

template <int MR>
inline void row_panel(int64_t N, int64_t K, const float* a, int64_t ars, int64_t acs,
                      const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  int64_t j = 0;
  for (; j + 16 <= N; j += 16) tile<MR, 2>(K, a, ars, acs, b + j, ldb, c + j, ldc, accumulate);
  for (; j + 8 <= N; j += 8) tile<MR, 1>(K, a, ars, acs, b + j, ldb, c + j, ldc, accumulate);
  for (; j < N; ++j)
    for (int i = 0; i < MR; ++i) {
      float s = 0.0f;
      for (int64_t k = 0; k < K; ++k) s += a[i * ars + k * acs] * b[k * ldb + j];
      float* p = c + i * ldc + j;
      *p = accumulate ? *p + s : s;
    }
}

// C[M x N] (+)= A[M x K] B[K x N], with A(i, k) = a[i * ars + k * acs],
// B(k, j) = b[k * ldb + j], C(i, j) = c[i * ldc + j].
void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t ars, int64_t acs,
          const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  int64_t i = 0;
  for (; i + 6 <= M; i += 6)
    row_panel<6>(N, K, a + i * ars, ars, acs, b, ldb, c + i * ldc, ldc, accumulate);
  for (; i + 4 <= M; i += 4)
    row_panel<4>(N, K, a + i * ars, ars, acs, b, ldb, c + i * ldc, ldc, accumulate);
  for (; i < M; ++i) row_panel<1>(N, K, a + i * ars, ars, acs, b, ldb, c + i * ldc, ldc, accumulate);
}

// Runs body(item, scratch) for item in [0, n) on the caller and the pool's
// other threads. Items are claimed from a shared counter, so tasks the pool
// starts late (or never, when every thread is busy) cost nothing; the caller
// returns once every claimed item is finished. `scratch` is one per thread.
template <typename Body>
void parallel_for(ffi::ThreadPool& pool, int64_t n, const Body& body) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, &body]() {
    std::vector<float> scratch;
    for (int64_t item; (item = state->next.fetch_add(1)) < n;) {
      body(item, scratch);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work]() { work(); });
  work();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

struct Dims {
  int64_t batch, lq, lk, heads, d;
};

ffi::Error check_dims(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k,
                      const ffi::Buffer<ffi::F32>& v, Dims* out) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  const size_t rank = qd.size();
  if (rank < 3 || kd.size() != rank || vd.size() != rank)
    return ffi::Error::InvalidArgument("avtok attention: q, k, v must be [..., L, heads, d] of one rank");
  for (size_t i = 0; i < rank; ++i) {
    if (kd[i] != vd[i]) return ffi::Error::InvalidArgument("avtok attention: k and v shapes differ");
    if (i != rank - 3 && qd[i] != kd[i])
      return ffi::Error::InvalidArgument("avtok attention: q and k differ outside the length dim");
  }
  Dims d{1, qd[rank - 3], kd[rank - 3], qd[rank - 2], qd[rank - 1]};
  for (size_t i = 0; i + 3 < rank; ++i) d.batch *= qd[i];
  if (d.lq < 1 || d.lk < 1 || d.d < 1)
    return ffi::Error::InvalidArgument("avtok attention: empty length or head dim");
  *out = d;
  return ffi::Error::Success();
}

constexpr int64_t kQueryBlock = 64;

inline int64_t round8(int64_t n) { return (n + 7) / 8 * 8; }

// Copies the [len, d] rows of one head (row stride `ld`) transposed into
// dst [d, len_padded].
void transpose_head(const float* src, int64_t len, int64_t d, int64_t ld, float* dst, int64_t ldd) {
  for (int64_t j = 0; j < len; ++j)
    for (int64_t c = 0; c < d; ++c) dst[c * ldd + j] = src[j * ld + c];
}

// Columns of query row `row` that may be attended to (causal: top-left).
inline int64_t valid_cols(bool causal, int64_t row, int64_t lk) {
  return causal ? std::min(row + 1, lk) : lk;
}

// One (batch, head) pair of the forward. qh, kh, vh, oh point at the head's
// first row; rows are `row` floats apart. lh: the head's [Lq] log-sum-exp.
void forward_head(const float* qh, const float* kh, const float* vh, float* oh, float* lh,
                  int64_t Lq, int64_t Lk, int64_t D, int64_t row, bool causal,
                  std::vector<float>& scratch) {
  const int64_t ldk = round8(Lk);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  scratch.resize(D * ldk + kQueryBlock * ldk + kQueryBlock);
  float* kt = scratch.data();
  float* s = kt + D * ldk;
  float* inv_sum = s + kQueryBlock * ldk;
  transpose_head(kh, Lk, D, row, kt, ldk);
  for (int64_t i0 = 0; i0 < Lq; i0 += kQueryBlock) {
    const int64_t m = std::min(kQueryBlock, Lq - i0);
    const int64_t n = valid_cols(causal, i0 + m - 1, Lk);
    gemm(m, n, D, qh + i0 * row, row, 1, kt, ldk, s, ldk, false);  // Q K^T
    for (int64_t i = 0; i < m; ++i) {
      float* si = s + i * ldk;
      const int64_t nv = valid_cols(causal, i0 + i, Lk);
      v8f mv = splat(-INFINITY);
      int64_t j = 0;
      for (; j + 8 <= nv; j += 8) {
        const v8f x = load8(si + j);
        mv = x > mv ? x : mv;
      }
      float mx = hmax(mv);
      for (; j < nv; ++j) mx = std::max(mx, si[j]);
      // exp(scale * s - scale * max): the scale folded into one multiply-add.
      const v8f sc = splat(scale), off = splat(-scale * mx);
      v8f sv = splat(0.0f);
      for (j = 0; j + 8 <= nv; j += 8) {
        v8f e = exp8(load8(si + j) * sc + off);
        store8(si + j, e);
        sv += e;
      }
      float sum = hsum(sv);
      for (; j < nv; ++j) sum += (si[j] = exp1(si[j] * scale - scale * mx));
      for (j = nv; j < n; ++j) si[j] = 0.0f;
      lh[i0 + i] = scale * mx + std::log(sum);
      inv_sum[i] = 1.0f / sum;
    }
    float* ob = oh + i0 * row;
    gemm(m, D, n, s, ldk, 1, vh, row, ob, row, false);  // unnormalised P V
    for (int64_t i = 0; i < m; ++i)
      for (int64_t c = 0; c < D; ++c) ob[i * row + c] *= inv_sum[i];
  }
}

// One (batch, head) pair of the backward (pointers as in forward_head; gh:
// the output's gradient; dqh, dkh, dvh: the inputs' gradients).
void backward_head(const float* qh, const float* kh, const float* vh, const float* oh,
                   const float* lh, const float* gh, float* dqh, float* dkh, float* dvh,
                   int64_t Lq, int64_t Lk, int64_t D, int64_t row, bool causal,
                   std::vector<float>& scratch) {
  const int64_t ldk = round8(Lk);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  // kt, vt [D, ldk]; p, ds [block, ldk]; dk, dv accumulators [Lk, D].
  scratch.resize(2 * D * ldk + 2 * kQueryBlock * ldk + 2 * Lk * D);
  float* kt = scratch.data();
  float* vt = kt + D * ldk;
  float* p = vt + D * ldk;
  float* ds = p + kQueryBlock * ldk;
  float* dk_acc = ds + kQueryBlock * ldk;
  float* dv_acc = dk_acc + Lk * D;
  std::fill(dk_acc, dk_acc + 2 * Lk * D, 0.0f);
  transpose_head(kh, Lk, D, row, kt, ldk);
  transpose_head(vh, Lk, D, row, vt, ldk);
  for (int64_t i0 = 0; i0 < Lq; i0 += kQueryBlock) {
    const int64_t m = std::min(kQueryBlock, Lq - i0);
    const int64_t n = valid_cols(causal, i0 + m - 1, Lk);
    gemm(m, n, D, qh + i0 * row, row, 1, kt, ldk, p, ldk, false);  // Q K^T
    gemm(m, n, D, gh + i0 * row, row, 1, vt, ldk, ds, ldk, false);  // dP = dO V^T
    for (int64_t i = 0; i < m; ++i) {
      float* pi = p + i * ldk;
      float* dsi = ds + i * ldk;
      const float* oi = oh + (i0 + i) * row;
      const float* gi = gh + (i0 + i) * row;
      float delta = 0.0f;
      for (int64_t c = 0; c < D; ++c) delta += oi[c] * gi[c];
      const int64_t nv = valid_cols(causal, i0 + i, Lk);
      const float l = lh[i0 + i];
      const v8f sc = splat(scale), off = splat(-l), dl = splat(delta);
      int64_t j = 0;
      for (; j + 8 <= nv; j += 8) {
        v8f pv = exp8(load8(pi + j) * sc + off);
        store8(pi + j, pv);
        store8(dsi + j, pv * (load8(dsi + j) - dl) * sc);  // scale * dS
      }
      for (; j < nv; ++j) {
        pi[j] = exp1(pi[j] * scale - l);
        dsi[j] = pi[j] * (dsi[j] - delta) * scale;
      }
      for (j = nv; j < n; ++j) pi[j] = dsi[j] = 0.0f;
    }
    // dV += P^T dO, dK += dS^T Q (A transposed through its strides); dQ = dS K.
    gemm(n, D, m, p, 1, ldk, gh + i0 * row, row, dv_acc, D, true);
    gemm(n, D, m, ds, 1, ldk, qh + i0 * row, row, dk_acc, D, true);
    gemm(m, D, n, ds, ldk, 1, kh, row, dqh + i0 * row, row, false);
  }
  for (int64_t j = 0; j < Lk; ++j) {
    std::memcpy(dkh + j * row, dk_acc + j * D, D * sizeof(float));
    std::memcpy(dvh + j * row, dv_acc + j * D, D * sizeof(float));
  }
}

ffi::Error AttentionForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                            ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                            ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse,
                            bool causal) {
  Dims dm;
  if (auto err = check_dims(q, k, v, &dm); !err.success()) return err;
  const int64_t H = dm.heads, D = dm.d, Lq = dm.lq, Lk = dm.lk, row = H * D;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = o->typed_data(), *lp = lse->typed_data();
  parallel_for(pool, dm.batch * H, [&](int64_t item, std::vector<float>& scratch) {
    const int64_t b = item / H, h = item % H;
    const int64_t qoff = b * Lq * row + h * D, koff = b * Lk * row + h * D;
    forward_head(qp + qoff, kp + koff, vp + koff, op + qoff, lp + item * Lq, Lq, Lk, D, row,
                 causal, scratch);
  });
  return ffi::Error::Success();
}

ffi::Error AttentionBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                             ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                             ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse,
                             ffi::Buffer<ffi::F32> d_o, ffi::ResultBuffer<ffi::F32> dq,
                             ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv,
                             bool causal) {
  Dims dm;
  if (auto err = check_dims(q, k, v, &dm); !err.success()) return err;
  const int64_t H = dm.heads, D = dm.d, Lq = dm.lq, Lk = dm.lk, row = H * D;
  if (o.element_count() != q.element_count() || d_o.element_count() != q.element_count() ||
      lse.element_count() != static_cast<size_t>(dm.batch * H * Lq))
    return ffi::Error::InvalidArgument("avtok attention backward: o / d_o / lse sizes do not match q");
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *opp = o.typed_data(), *lp = lse.typed_data(), *gp = d_o.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  parallel_for(pool, dm.batch * H, [&](int64_t item, std::vector<float>& scratch) {
    const int64_t b = item / H, h = item % H;
    const int64_t qoff = b * Lq * row + h * D, koff = b * Lk * row + h * D;
    backward_head(qp + qoff, kp + koff, vp + koff, opp + qoff, lp + item * Lq, gp + qoff,
                  dqp + qoff, dkp + koff, dvp + koff, Lq, Lk, D, row, causal, scratch);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AvtokAttentionForward, AttentionForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("causal"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AvtokAttentionBackward, AttentionBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("causal"));
