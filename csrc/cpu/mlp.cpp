// The transformer MLP, fc2(gelu(fc1(x))) with the exact (erf) GELU, fused on the CPU in float32, and
// the pre-norm block's pieces built from it: LayerNorm in front (its rows' mean and 1/std kept for the
// backward), the residual added in the epilogue, and LayerNorm + one Linear (the qkv projection).
//
// x (M, D), w1 (Hd, D), b1 (Hd), w2 (D, Hd), b2 (D), out (M, D); all contiguous. Unfused, the hidden
// tensor goes through memory five or six times per step (fc1's output, the bias pass, GELU's input
// and output, GELU's backward and fc2's weight gradient) and is kept for the backward. Here each
// thread takes a contiguous range of rows and works through it in chunks of kChunk rows whose hidden
// activations stay in a per-thread buffer in L2; of the hidden layer at most fc1's output is kept:
//   forward   H = x_c W1^T + b1, H = gelu(H), out_c = H W2^T + b2
//   backward  G = dY_c W2; H = x_c W1^T + b1, either as the forward wrote it (hidden_out / hidden_in:
//             M x Hd floats kept per layer; copying a chunk back costs a fraction of the GEMM) or
//             recomputed (nothing kept); A = gelu(H), G *= gelu'(H) (one exp serves both);
//             dW2 += dY_c^T A, db2 += colsum dY_c, dW1 += G^T x_c, db1 += colsum G (per-thread
//             accumulators, summed at the end); dx_c = G W1
// The products are register-blocked micro-GEMMs (MR rows x 16*NV columns of accumulators) on weights
// packed once per call into column panels. The AVX-512 build uses 12 x 32 tiles (24 zmm accumulators),
// AVX2 and older 4 x 16 ones; the variant is picked once at load time from the CPU's features.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../ops.h"
#include "parallel.h"
#include "simd.h"

namespace mvmae_fast {
namespace {

constexpr int64_t kChunk = 96;  // rows per chunk (a multiple of every MR below)

enum Epilogue { kStore, kStoreBias, kAccumulate };

template <int NV>
struct Tiles {
  static constexpr int64_t NR = 16 * NV;  // panel width
  static int64_t pad(int64_t n) { return (n + NR - 1) / NR * NR; }

  // acc = op(A)[MR x K] B[K x NR]: A row-major (lda) or, TRANS_A, stored K x MR (lda); B's rows are
  // NR floats at stride ldb. Then the epilogue: columns [c0, c0 + NR) of C's MR rows, clipped to n;
  // kStoreBias adds bias (padded to a multiple of NR), a non-null res adds its rows (laid out as C's),
  // kAccumulate adds C's current values (C padded).
  template <int MR, bool TRANS_A, Epilogue E>
  MVF_INLINE static void tile(const float* __restrict A, int64_t lda, const float* __restrict B, int64_t ldb,
                              int64_t K, float* __restrict C, int64_t ldc, int64_t c0, int64_t n,
                              const float* __restrict bias, const float* __restrict res) {
    // The lines this tile writes (and, accumulating, reads) are requested for writing during the K
    // loop, one row's lines at the start of each MR-th part of it: an output the caller has not touched recently
    // (every fresh activation) otherwise stalls each store on a read-for-ownership, and requesting
    // all MR x NV lines at once, before the loop, stalled on the core's line-fill buffers instead
    // (~10% of the pre-norm linear's forward in a profile of the training step).
    vec16 acc[MR][NV];
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] = vec16{};
    int64_t k = 0;
#pragma GCC unroll 1
    for (int row = 0; row < MR; ++row) {
      for (int v = 0; v < NV; ++v)
        if (c0 + 16 * v < n) __builtin_prefetch(C + row * ldc + c0 + 16 * v, 1, 3);
      const int64_t stop = K * (row + 1) / MR;
#pragma GCC unroll 4
      for (; k < stop; ++k) {  // unrolled: ~5-10% over the bare loop in a standalone test
        vec16 b[NV];
        for (int v = 0; v < NV; ++v) std::memcpy(&b[v], B + k * ldb + 16 * v, sizeof(vec16));
        for (int r = 0; r < MR; ++r) {
          const float a = TRANS_A ? A[k * lda + r] : A[r * lda + k];
          for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
        }
      }
    }
    for (int v = 0; v < NV; ++v) {
      const int64_t col = c0 + 16 * v;
      if (col >= n) break;
      const int64_t count = std::min<int64_t>(16, n - col);
      vec16 add{};
      if (E == kStoreBias) std::memcpy(&add, bias + col, sizeof add);
      for (int r = 0; r < MR; ++r) {
        float* dst = C + r * ldc + col;
        vec16 value = acc[r][v] + add;
        if (res) value += load_lanes(res + r * ldc + col, count);
        if (E == kAccumulate) {
          vec16 old;
          std::memcpy(&old, dst, sizeof old);
          value += old;
        }
        store_lanes(dst, value, count);
      }
    }
  }

  // C[M x n] (per the epilogue) = op(A)[M x K] B[K x n], B as panels: panel p starts at
  // B + p * panel_stride with rows ldb apart (packed: panel_stride K * NR, ldb NR; a padded row-major
  // matrix: panel_stride NR, ldb its row length). Panel-outer, so a panel stays in L1 across the rows.
  // With `ahead`, one ahead->step() per full MR-row tile: tiles<MR>(M, n) of them.
  template <int MR>
  static int64_t tiles(int64_t M, int64_t n) { return M / MR * ((n + NR - 1) / NR); }
  template <int MR, bool TRANS_A, Epilogue E>
  MVF_INLINE static void gemm(const float* A, int64_t lda, const float* B, int64_t panel_stride, int64_t ldb,
                              float* C, int64_t ldc, int64_t M, int64_t n, int64_t K, const float* bias,
                              const float* res, Ahead* ahead = nullptr) {
    const int64_t row_step = TRANS_A ? 1 : lda;
    for (int64_t c0 = 0, p = 0; c0 < n; c0 += NR, ++p) {
      const float* Bp = B + p * panel_stride;
      int64_t m = 0;
      for (; m + MR <= M; m += MR) {
        tile<MR, TRANS_A, E>(A + m * row_step, lda, Bp, ldb, K, C + m * ldc, ldc, c0, n, bias, res ? res + m * ldc : nullptr);
        if (ahead) ahead->step();
      }
      // The remaining rows (fewer than MR) as 8 + 4 + 2 + 1.
      if constexpr (MR > 8) if (M - m >= 8) {
        tile<8, TRANS_A, E>(A + m * row_step, lda, Bp, ldb, K, C + m * ldc, ldc, c0, n, bias, res ? res + m * ldc : nullptr);
        m += 8;
      }
      if constexpr (MR > 4) if (M - m >= 4) {
        tile<4, TRANS_A, E>(A + m * row_step, lda, Bp, ldb, K, C + m * ldc, ldc, c0, n, bias, res ? res + m * ldc : nullptr);
        m += 4;
      }
      if constexpr (MR > 2) if (M - m >= 2) {
        tile<2, TRANS_A, E>(A + m * row_step, lda, Bp, ldb, K, C + m * ldc, ldc, c0, n, bias, res ? res + m * ldc : nullptr);
        m += 2;
      }
      if (M - m >= 1) tile<1, TRANS_A, E>(A + m * row_step, lda, Bp, ldb, K, C + m * ldc, ldc, c0, n, bias, res ? res + m * ldc : nullptr);
    }
  }

  // Panels [p0, p1) of B (K x N), B(k, j) = S[k * sk + j * sn]: Bp[p][k][0..NR), zero past column N.
  // A transposed source (sk == 1: the forward's W^T, whose panel rows are W's columns) goes through
  // 16 x 16 blocks read row by row and transposed in registers; element by element, each of its
  // loads lands on another of W's rows (~2x slower for the encoder's 768 x 192 weights).
  MVF_INLINE static void pack(const float* S, int64_t sk, int64_t sn, int64_t K, int64_t N, float* Bp, int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      float* dst = Bp + p * K * NR;
      const int64_t j0 = p * NR, width = std::min<int64_t>(NR, N - j0);
      int64_t k = 0;
      if (sk == 1 && width == NR)
        for (; k + 16 <= K; k += 16)
          for (int64_t j = 0; j < NR; j += 16) {
            vec16 r[16];
            for (int i = 0; i < 16; ++i) std::memcpy(&r[i], S + k + (j0 + j + i) * sn, sizeof(vec16));
            transpose16(r);  // r[i] = B(k + i, j .. j + 15)
            for (int i = 0; i < 16; ++i) std::memcpy(dst + (k + i) * NR + j, &r[i], sizeof(vec16));
          }
      for (; k < K; ++k) {
        for (int64_t j = 0; j < width; ++j) dst[k * NR + j] = S[k * sk + (j0 + j) * sn];
        for (int64_t j = width; j < NR; ++j) dst[k * NR + j] = 0.0f;
      }
    }
  }
};

// Everything a range of rows needs; pointers into the caller's tensors and the shared workspace.
struct MlpArgs {
  int64_t dim, hidden;
  const float* x;
  const float *gamma, *beta;  // the LayerNorm in front (null: none)
  float eps;
  bool residual;              // out = x + mlp(...)
  const float *b1, *b2;       // padded copies (forward)
  const float *w1_t, *w2_t;   // packed W1^T (D x Hd) and W2^T (Hd x D) (W1^T in the backward too)
  const float *w2, *w1;       // packed W2 (D x Hd) and W1 (Hd x D) (backward)
  const float* grad_out;
  float *out, *dx;
  float *mean, *rstd;         // per row, with the norm: written by the forward, read by the backward
  float* hidden_out;          // forward: fc1's output (M x Hd, before GELU) is also written here (or null)
  const float* hidden_in;     // backward: fc1's output as the forward wrote it (null: recomputed)
  const float* addend;        // the Linear: rows added to out (forward) or to dx (backward), or null
};

// fc1's input rows for a chunk into dst (R x np, zero padded): LayerNorm(x) when the args have a
// norm (the forward computes and stores the statistics, the backward reads them), else x.
MVF_INLINE void input_rows(const MlpArgs& a, int64_t c, int64_t R, int64_t np, bool compute_stats, float* dst) {
  const int64_t D = a.dim;
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = a.x + (c + r) * D;
    float* out = dst + r * np;
    if (!a.gamma) {
      for (int64_t d = 0; d < D; ++d) out[d] = xr[d];
      for (int64_t d = D; d < np; ++d) out[d] = 0.0f;
      continue;
    }
    if (compute_stats) row_stats(xr, D, a.eps, a.mean[c + r], a.rstd[c + r]);
    norm_row(xr, D, np, a.gamma, a.beta, a.mean[c + r], a.rstd[c + r], out);
  }
}

template <int MR, int NV>
MVF_INLINE void forward_rows(const MlpArgs& a, int64_t r0, int64_t r1, float* slot) {
  using T = Tiles<NV>;
  const int64_t D = a.dim, Hd = a.hidden, hp = T::pad(Hd), dp = T::pad(D);
  float* h = slot;                // kChunk x hp
  float* xn = h + kChunk * hp;    // kChunk x dp: the normalised rows
  for (int64_t c = r0; c < r1; c += kChunk) {
    const int64_t R = std::min(kChunk, r1 - c);
    const float* in = a.x + c * D;
    int64_t ld = D;
    if (a.gamma) {
      input_rows(a, c, R, dp, true, xn);
      in = xn;
      ld = dp;
    }
    // fc1's output goes straight to hidden_out when the caller keeps it (no copy), else to h; GELU
    // then reads it from there and writes h.
    float* pre = a.hidden_out ? a.hidden_out + c * Hd : h;
    const int64_t ld_pre = a.hidden_out ? Hd : hp;
    T::template gemm<MR, false, kStoreBias>(in, ld, a.w1_t, D * T::NR, T::NR, pre, ld_pre, R, Hd, D, a.b1, nullptr);
    for (int64_t r = 0; r < R; ++r) {
      const float* pr = pre + r * ld_pre;
      float* hr = h + r * hp;
      for (int64_t j = 0; j < Hd; ++j) {
        float value, grad;
        gelu_and_grad(pr[j], value, grad);
        hr[j] = value;
      }
    }
    Ahead ahead;  // the next chunk's rows of x, for its LayerNorm
    ahead.add_rows(a.x, D, c + R, std::min(kChunk, r1 - c - R));
    ahead.pace(T::template tiles<MR>(R, D));
    T::template gemm<MR, false, kStoreBias>(h, hp, a.w2_t, Hd * T::NR, T::NR, a.out + c * D, D, R, D, Hd, a.b2,
                                            a.residual ? a.x + c * D : nullptr, &ahead);
  }
}

int64_t padded(int64_t n);  // n rounded up to the panel width of the variant in use (below)

int64_t forward_scratch(int64_t D, int64_t Hd) {
  return kChunk * (padded(Hd) + padded(D));
}

// Per slot: G and A (kChunk x hp), x_c and dxn (kChunk x dp), dW1 (Hd x dp), dW2 (D x hp), then the
// vector accumulators db1 (hp), db2, dgamma, dbeta (dp each), and the same four for one chunk.
int64_t backward_scratch(int64_t D, int64_t Hd) {
  const int64_t hp = padded(Hd), dp = padded(D);
  return 2 * kChunk * hp + 2 * kChunk * dp + Hd * dp + D * hp + 2 * (hp + 3 * dp);
}

template <int MR, int NV>
MVF_INLINE void backward_rows(const MlpArgs& a, int64_t r0, int64_t r1, float* slot) {
  using T = Tiles<NV>;
  const int64_t D = a.dim, Hd = a.hidden, hp = T::pad(Hd), dp = T::pad(D);
  float* g = slot;                    // kChunk x hp: dAct, then dPre
  float* act = g + kChunk * hp;       // kChunk x hp: fc1's output, then its gelu
  float* xc = act + kChunk * hp;      // kChunk x dp: fc1's input rows (normalised), padded
  float* dxn = xc + kChunk * dp;      // kChunk x dp: the gradient of the normalised rows
  float* dw1 = dxn + kChunk * dp;     // Hd x dp
  float* dw2 = dw1 + Hd * dp;         // D x hp
  float* db1 = dw2 + D * hp;          // hp
  float* db2 = db1 + hp;              // dp
  float* dgamma = db2 + dp;           // dp
  float* dbeta = dgamma + dp;         // dp
  // The vector gradients are summed per chunk, then added up chunk by chunk (as the weight gradients
  // are): one running sum over all of a thread's rows would lose ~sqrt(rows) ulps.
  float* chunk_sums = dbeta + dp;     // db1, db2, dgamma, dbeta of the current chunk
  const int64_t vectors = hp + 3 * dp;
  // The first chunk stores the weight gradients (no zero fill, no read of the accumulators).
  std::fill(r0 < r1 ? db1 : dw1, chunk_sums, 0.0f);
  for (int64_t c = r0; c < r1; c += kChunk) {
    const int64_t R = std::min(kChunk, r1 - c);
    std::fill(chunk_sums, chunk_sums + vectors, 0.0f);
    float* cb1 = chunk_sums;
    float* cb2 = cb1 + hp;
    float* cgamma = cb2 + dp;
    float* cbeta = cgamma + dp;
    const float* dy = a.grad_out + c * D;
    Ahead hidden;  // this chunk's rows of fc1's kept output, for the GELU pass below
    if (a.hidden_in) hidden.add_rows(a.hidden_in, Hd, c, R);
    hidden.pace(T::template tiles<MR>(R, hp));
    T::template gemm<MR, false, kStore>(dy, D, a.w2, D * T::NR, T::NR, g, hp, R, hp, D, nullptr, nullptr, &hidden);
    input_rows(a, c, R, dp, false, xc);
    // fc1's output: the forward's, read in place (the same bits the GEMM would recompute), or recomputed
    if (!a.hidden_in)
      T::template gemm<MR, false, kStoreBias>(xc, dp, a.w1_t, D * T::NR, T::NR, act, hp, R, Hd, D, a.b1, nullptr);
    const float* pre = a.hidden_in ? a.hidden_in + c * Hd : act;
    const int64_t ld_pre = a.hidden_in ? Hd : hp;
    for (int64_t r = 0; r < R; ++r) {
      float* gr = g + r * hp;
      float* ar = act + r * hp;  // gelu of fc1's output
      const float* pr = pre + r * ld_pre;
      for (int64_t j = 0; j < Hd; ++j) {
        float value, grad;
        gelu_and_grad(pr[j], value, grad);
        ar[j] = value;
        gr[j] *= grad;
      }
      for (int64_t j = Hd; j < hp; ++j) ar[j] = gr[j] = 0.0f;
      for (int64_t j = 0; j < hp; ++j) cb1[j] += gr[j];
      const float* dyr = dy + r * D;
      for (int64_t d = 0; d < D; ++d) cb2[d] += dyr[d];
    }
    Ahead next;  // the next chunk's rows of dY and x
    next.add_rows(a.grad_out, D, c + R, std::min(kChunk, r1 - c - R));
    next.add_rows(a.x, D, c + R, std::min(kChunk, r1 - c - R));
    next.pace(T::template tiles<MR>(D, hp));
    if (c == r0) {
      T::template gemm<MR, true, kStore>(dy, D, act, T::NR, hp, dw2, hp, D, hp, R, nullptr, nullptr, &next);  // dY^T A
      T::template gemm<MR, true, kStore>(g, hp, xc, T::NR, dp, dw1, dp, Hd, dp, R, nullptr, nullptr);  // G^T x
    } else {
      T::template gemm<MR, true, kAccumulate>(dy, D, act, T::NR, hp, dw2, hp, D, hp, R, nullptr, nullptr, &next);
      T::template gemm<MR, true, kAccumulate>(g, hp, xc, T::NR, dp, dw1, dp, Hd, dp, R, nullptr, nullptr);
    }
    if (!a.gamma) {  // dx = G W1 (+ dY)
      T::template gemm<MR, false, kStore>(g, hp, a.w1, Hd * T::NR, T::NR, a.dx + c * D, D, R, D, Hd, nullptr,
                                          a.residual ? dy : nullptr);
      for (int64_t i = 0; i < vectors; ++i) db1[i] += chunk_sums[i];  // db1..dbeta are contiguous
      continue;
    }
    Ahead out;  // this chunk's rows of dx, written below
    out.add_rows(a.dx, D, c, R);
    out.pace(T::template tiles<MR>(R, D));
    T::template gemm<MR, false, kStore>(g, hp, a.w1, Hd * T::NR, T::NR, dxn, dp, R, D, Hd, nullptr, nullptr, &out);
    for (int64_t r = 0; r < R; ++r)
      norm_backward_row(a.x + (c + r) * D, dxn + r * dp, D, a.mean[c + r], a.rstd[c + r], a.gamma,
                        a.residual ? dy + r * D : nullptr, a.dx + (c + r) * D, cgamma, cbeta);
    for (int64_t i = 0; i < vectors; ++i) db1[i] += chunk_sums[i];
  }
}

// LayerNorm then one Linear (a pre-norm block's qkv projection): out = LN(x) W^T + b, W (Hd x D) and
// b in the args' fc1 slots. Same chunking; the backward recomputes the normalised rows.
template <int MR, int NV>
MVF_INLINE void linear_forward_rows(const MlpArgs& a, int64_t r0, int64_t r1, float* slot) {
  using T = Tiles<NV>;
  const int64_t D = a.dim, Hd = a.hidden, dp = T::pad(D);
  for (int64_t c = r0; c < r1; c += kChunk) {
    const int64_t R = std::min(kChunk, r1 - c);
    const float* in = a.x + c * D;  // without a norm the GEMM reads x in place
    int64_t ld = D;
    if (a.gamma) {
      input_rows(a, c, R, dp, true, slot);
      in = slot;
      ld = dp;
    }
    Ahead ahead;  // the next chunk's rows of x
    ahead.add_rows(a.x, D, c + R, std::min(kChunk, r1 - c - R));
    ahead.pace(T::template tiles<MR>(R, Hd));
    T::template gemm<MR, false, kStoreBias>(in, ld, a.w1_t, D * T::NR, T::NR, a.out + c * Hd, Hd, R, Hd, D, a.b1,
                                            a.addend ? a.addend + c * Hd : nullptr, &ahead);
  }
}

int64_t linear_forward_scratch(int64_t D, int64_t) {
  return kChunk * padded(D);
}

// Per slot: x_c and dxn (kChunk x dp), dW (Hd x dp), then db (hp), dgamma, dbeta (dp), and the same
// three for one chunk.
int64_t linear_backward_scratch(int64_t D, int64_t Hd) {
  const int64_t hp = padded(Hd), dp = padded(D);
  return 2 * kChunk * dp + Hd * dp + 2 * (hp + 2 * dp);
}

template <int MR, int NV>
MVF_INLINE void linear_backward_rows(const MlpArgs& a, int64_t r0, int64_t r1, float* slot) {
  using T = Tiles<NV>;
  const int64_t D = a.dim, Hd = a.hidden, hp = T::pad(Hd), dp = T::pad(D);
  float* xc = slot;                  // kChunk x dp
  float* dxn = xc + kChunk * dp;     // kChunk x dp
  float* dw = dxn + kChunk * dp;     // Hd x dp
  float* db = dw + Hd * dp;          // hp, then dgamma, dbeta (dp each)
  float* chunk_sums = db + hp + 2 * dp;
  const int64_t vectors = hp + 2 * dp;
  std::fill(r0 < r1 ? db : dw, chunk_sums, 0.0f);  // the first chunk stores dW (as in backward_rows)
  for (int64_t c = r0; c < r1; c += kChunk) {
    const int64_t R = std::min(kChunk, r1 - c);
    std::fill(chunk_sums, chunk_sums + vectors, 0.0f);
    float* cgamma = chunk_sums + hp;
    float* cbeta = cgamma + dp;
    const float* dy = a.grad_out + c * Hd;
    // db's chunk sums eight rows at a time (a running sum over the chunk's 96 rows erred ~3 ulps)
    for (int64_t r = 0; r < R; r += 8) {
      const int64_t n = std::min<int64_t>(8, R - r);
      for (int64_t j = 0; j < Hd; ++j) {
        float part = 0.0f;
        for (int64_t i = 0; i < n; ++i) part += dy[(r + i) * Hd + j];
        chunk_sums[j] += part;
      }
    }
    input_rows(a, c, R, dp, false, xc);
    Ahead next;  // the next chunk's rows of dY and x
    next.add_rows(a.grad_out, Hd, c + R, std::min(kChunk, r1 - c - R));
    next.add_rows(a.x, D, c + R, std::min(kChunk, r1 - c - R));
    next.pace(T::template tiles<MR>(Hd, dp));
    if (c == r0) T::template gemm<MR, true, kStore>(dy, Hd, xc, T::NR, dp, dw, dp, Hd, dp, R, nullptr, nullptr, &next);  // dY^T xn
    else T::template gemm<MR, true, kAccumulate>(dy, Hd, xc, T::NR, dp, dw, dp, Hd, dp, R, nullptr, nullptr, &next);
    if (!a.gamma) {  // dx = dY W (+ addend)
      T::template gemm<MR, false, kStore>(dy, Hd, a.w1, Hd * T::NR, T::NR, a.dx + c * D, D, R, D, Hd, nullptr,
                                          a.addend ? a.addend + c * D : nullptr);
      for (int64_t i = 0; i < vectors; ++i) db[i] += chunk_sums[i];
      continue;
    }
    Ahead out;  // this chunk's rows of dx, written below
    out.add_rows(a.dx, D, c, R);
    out.pace(T::template tiles<MR>(R, D));
    T::template gemm<MR, false, kStore>(dy, Hd, a.w1, Hd * T::NR, T::NR, dxn, dp, R, D, Hd, nullptr, nullptr, &out);
    for (int64_t r = 0; r < R; ++r)
      norm_backward_row(a.x + (c + r) * D, dxn + r * dp, D, a.mean[c + r], a.rstd[c + r], a.gamma,
                        a.addend ? a.addend + (c + r) * D : nullptr, a.dx + (c + r) * D, cgamma, cbeta);
    for (int64_t i = 0; i < vectors; ++i) db[i] += chunk_sums[i];
  }
}

// One instantiation per instruction set, chosen at load time (see the file comment).
struct Variant {
  const char* name;
  int nv;
  void (*forward)(const MlpArgs&, int64_t, int64_t, float*);
  void (*backward)(const MlpArgs&, int64_t, int64_t, float*);
  void (*linear_forward)(const MlpArgs&, int64_t, int64_t, float*);
  void (*linear_backward)(const MlpArgs&, int64_t, int64_t, float*);
  void (*pack)(const float*, int64_t, int64_t, int64_t, int64_t, float*, int64_t, int64_t);
};

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && defined(__linux__)
#define MVF_MLP_DISPATCH 1
#endif
#define MVF_VARIANT(NAME, TARGET, MR, NV)                                                                  \
  TARGET void NAME##_forward(const MlpArgs& a, int64_t r0, int64_t r1, float* s) { forward_rows<MR, NV>(a, r0, r1, s); } \
  TARGET void NAME##_backward(const MlpArgs& a, int64_t r0, int64_t r1, float* s) { backward_rows<MR, NV>(a, r0, r1, s); } \
  TARGET void NAME##_linear_forward(const MlpArgs& a, int64_t r0, int64_t r1, float* s) {                  \
    linear_forward_rows<MR, NV>(a, r0, r1, s);                                                             \
  }                                                                                                        \
  TARGET void NAME##_linear_backward(const MlpArgs& a, int64_t r0, int64_t r1, float* s) {                 \
    linear_backward_rows<MR, NV>(a, r0, r1, s);                                                            \
  }                                                                                                        \
  TARGET void NAME##_pack(const float* S, int64_t sk, int64_t sn, int64_t K, int64_t N, float* Bp, int64_t p0, int64_t p1) { \
    Tiles<NV>::pack(S, sk, sn, K, N, Bp, p0, p1);                                                          \
  }
#ifdef MVF_MLP_DISPATCH
MVF_VARIANT(avx512, __attribute__((target("arch=x86-64-v4"))), 12, 2)
MVF_VARIANT(avx2, __attribute__((target("arch=x86-64-v3"))), 4, 1)
#endif
MVF_VARIANT(generic, , 4, 1)

// MVMAE_FAST_CPU_ISA=avx2|generic picks a lower variant than the CPU supports (cpu_isa in simd.h), so
// the tests can run every variant on one machine.
const Variant& variant() {
  static const Variant chosen = [] {
#ifdef MVF_MLP_DISPATCH
    if (cpu_isa() >= kIsaAvx512)
      return Variant{"avx512", 2, avx512_forward, avx512_backward, avx512_linear_forward, avx512_linear_backward,
                     avx512_pack};
    if (cpu_isa() >= kIsaAvx2)
      return Variant{"avx2", 1, avx2_forward, avx2_backward, avx2_linear_forward, avx2_linear_backward, avx2_pack};
#endif
    return Variant{"generic", 1, generic_forward, generic_backward, generic_linear_forward, generic_linear_backward,
                   generic_pack};
  }();
  return chosen;
}

int64_t panel_width() { return 16 * variant().nv; }
int64_t padded(int64_t n) { return (n + panel_width() - 1) / panel_width() * panel_width(); }

// A per-calling-thread workspace that only grows, so steady-state training allocates (and page-faults)
// nothing here.
float* workspace(int64_t floats) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < floats) {
    buffer.clear();
    buffer.shrink_to_fit();
    buffer.resize(static_cast<size_t>(floats));
  }
  return buffer.data();
}

// Packs B (K x N), B(k, j) = S[k * sk + j * sn], into panels at dst, in parallel over panels.
void pack_parallel(const float* S, int64_t sk, int64_t sn, int64_t K, int64_t N, float* dst, int threads) {
  const int64_t panels = padded(N) / panel_width();
  const auto pack = variant().pack;
  parallel_for(panels, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K * panel_width())), threads,
               [&](int64_t p0, int64_t p1) { pack(S, sk, sn, K, N, dst, p0, p1); });
}

// dst[0, n) = src, dst[n, np) = 0: a bias as the epilogues read it (whole panels).
void copy_padded(const float* src, int64_t n, int64_t np, float* dst) {
  std::copy(src, src + n, dst);
  std::fill(dst + n, dst + np, 0.0f);
}

// Rows split into `slots` contiguous ranges, one per thread: at most one per chunk of rows.
int64_t row_slots(int64_t rows, int threads) {
  const int64_t chunks = (rows + kChunk - 1) / kChunk;
  return std::max<int64_t>(1, std::min<int64_t>(threads, chunks));
}

// Where slot s's rows start: an even split rounded to a multiple of kSlotAlign rows (a multiple of
// every MR), so each thread gets the same work to within a few rows. (Whole chunks per slot left the
// encoder's 1088 rows as 576 + 512: one thread idle for 6% of every call.) Each slot then works
// through its range in chunks of up to kChunk rows.
constexpr int64_t kSlotAlign = 12;
int64_t slot_start(int64_t rows, int64_t slots, int64_t s) {
  if (s >= slots) return rows;
  return std::min(rows, (rows * s / slots + kSlotAlign / 2) / kSlotAlign * kSlotAlign);
}

template <class Fn>
void for_each_slot(int64_t rows, int64_t slots, int threads, const Fn& fn) {
  parallel_for(slots, 1, threads, [&](int64_t s0, int64_t s1) {
    const FlushDenormals flush;
    for (int64_t s = s0; s < s1; ++s) fn(s, slot_start(rows, slots, s), slot_start(rows, slots, s + 1));
  });
}

// dst (rows x width, contiguous) = the sum over slots of the (rows x ld) matrix at `offset` in each
// slot's scratch, in slot order (deterministic for a thread count); parallel over rows.
void sum_slots(const float* scratch, int64_t slots, int64_t per_slot, int64_t offset, int64_t rows, int64_t width,
               int64_t ld, float* dst, int threads) {
  parallel_for(rows, 64, threads, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float* src = scratch + offset + i * ld;
      float* out = dst + i * width;
      std::copy(src, src + width, out);
      for (int64_t s = 1; s < slots; ++s)
        for (int64_t j = 0; j < width; ++j) out[j] += src[s * per_slot + j];
    }
  });
}

}  // namespace

const char* fused_layers_isa() { return variant().name; }

void mlp_forward_cpu(const float* x, const float* w1, const float* b1, const float* w2, const float* b2,
                     const float* norm_weight, const float* norm_bias, float eps, bool residual, float* out, float* mean,
                     float* rstd, float* hidden_out, int64_t rows, int64_t dim, int64_t hidden, int threads) {
  const int64_t D = dim, Hd = hidden, hp = padded(Hd), dp = padded(D);
  const int64_t slots = row_slots(rows, threads);
  const int64_t per_slot = forward_scratch(D, Hd);
  float* ws = workspace(2 * hp * dp + hp + dp + slots * per_slot);
  float* w1_t = ws;             // W1^T: K = D, N = Hd
  float* w2_t = w1_t + hp * D;  // W2^T: K = Hd, N = D
  float* bias1 = w2_t + dp * Hd;
  float* bias2 = bias1 + hp;
  float* scratch = bias2 + dp;
  pack_parallel(w1, 1, D, D, Hd, w1_t, threads);
  pack_parallel(w2, 1, Hd, Hd, D, w2_t, threads);
  copy_padded(b1, Hd, hp, bias1);
  copy_padded(b2, D, dp, bias2);
  MlpArgs a{};
  a.dim = D, a.hidden = Hd, a.x = x, a.out = out;
  a.gamma = norm_weight, a.beta = norm_bias, a.eps = eps, a.residual = residual, a.mean = mean, a.rstd = rstd;
  a.w1_t = w1_t, a.w2_t = w2_t, a.b1 = bias1, a.b2 = bias2, a.hidden_out = hidden_out;
  const auto forward = variant().forward;
  for_each_slot(rows, slots, threads, [&](int64_t s, int64_t r0, int64_t r1) {
    forward(a, r0, r1, scratch + s * per_slot);
  });
}

void mlp_backward_cpu(const float* grad_out, const float* x, const float* mean, const float* rstd,
                      const float* norm_weight, const float* norm_bias, bool residual, const float* w1, const float* b1,
                      const float* w2, float* dx, float* dw1, float* db1, float* dw2, float* db2, float* dnorm_weight,
                      float* dnorm_bias, const float* hidden_in, int64_t rows, int64_t dim, int64_t hidden,
                      int threads) {
  const int64_t D = dim, Hd = hidden, hp = padded(Hd), dp = padded(D);
  const int64_t slots = row_slots(rows, threads);
  const int64_t per_slot = backward_scratch(D, Hd);
  float* ws = workspace(3 * hp * dp + hp + slots * per_slot);
  float* w2p = ws;             // W2: K = D, N = Hd
  float* w1p = w2p + dp * hp;  // W1: K = Hd, N = D
  float* w1t = w1p + hp * dp;  // W1^T, to recompute fc1: K = D, N = Hd
  float* bias1 = w1t + hp * dp;
  float* scratch = bias1 + hp;
  pack_parallel(w2, Hd, 1, D, Hd, w2p, threads);
  pack_parallel(w1, D, 1, Hd, D, w1p, threads);
  if (!hidden_in) {  // fc1 is recomputed
    pack_parallel(w1, 1, D, D, Hd, w1t, threads);
    copy_padded(b1, Hd, hp, bias1);
  }
  MlpArgs a{};
  a.w1_t = w1t, a.b1 = bias1, a.hidden_in = hidden_in;
  a.dim = D, a.hidden = Hd, a.x = x, a.grad_out = grad_out;
  a.gamma = norm_weight, a.beta = norm_bias, a.residual = residual;
  a.mean = const_cast<float*>(mean), a.rstd = const_cast<float*>(rstd);
  a.w2 = w2p, a.w1 = w1p, a.dx = dx;
  const auto backward = variant().backward;
  for_each_slot(rows, slots, threads, [&](int64_t s, int64_t r0, int64_t r1) {
    backward(a, r0, r1, scratch + s * per_slot);
  });
  // Sum the slots' accumulators into the outputs.
  const int64_t dw1_at = 2 * kChunk * hp + 2 * kChunk * dp, dw2_at = dw1_at + Hd * dp, vectors_at = dw2_at + D * hp;
  sum_slots(scratch, slots, per_slot, dw1_at, Hd, D, dp, dw1, threads);
  sum_slots(scratch, slots, per_slot, dw2_at, D, Hd, hp, dw2, threads);
  sum_slots(scratch, slots, per_slot, vectors_at, 1, Hd, hp, db1, threads);
  sum_slots(scratch, slots, per_slot, vectors_at + hp, 1, D, dp, db2, threads);
  if (norm_weight) {
    sum_slots(scratch, slots, per_slot, vectors_at + hp + dp, 1, D, dp, dnorm_weight, threads);
    sum_slots(scratch, slots, per_slot, vectors_at + hp + 2 * dp, 1, D, dp, dnorm_bias, threads);
  }
}

void norm_linear_forward_cpu(const float* x, const float* norm_weight, const float* norm_bias, float eps,
                             const float* w, const float* b, const float* addend, float* out, float* mean, float* rstd,
                             int64_t rows, int64_t dim, int64_t out_dim, int threads) {
  const int64_t D = dim, Hd = out_dim, hp = padded(Hd);
  const int64_t slots = row_slots(rows, threads);
  const int64_t per_slot = linear_forward_scratch(D, Hd);
  float* ws = workspace(hp * D + hp + slots * per_slot);
  float* w_t = ws;  // W^T: K = D, N = Hd
  float* bias = w_t + hp * D;
  float* scratch = bias + hp;
  pack_parallel(w, 1, D, D, Hd, w_t, threads);
  copy_padded(b, Hd, hp, bias);
  MlpArgs a{};
  a.dim = D, a.hidden = Hd, a.x = x, a.out = out;
  a.gamma = norm_weight, a.beta = norm_bias, a.eps = eps, a.mean = mean, a.rstd = rstd, a.w1_t = w_t, a.b1 = bias;
  a.addend = addend;
  const auto forward = variant().linear_forward;
  for_each_slot(rows, slots, threads, [&](int64_t s, int64_t r0, int64_t r1) {
    forward(a, r0, r1, scratch + s * per_slot);
  });
}

void norm_linear_backward_cpu(const float* grad_out, const float* x, const float* mean, const float* rstd,
                              const float* norm_weight, const float* norm_bias, const float* w, const float* addend,
                              float* dx, float* dnorm_weight, float* dnorm_bias, float* dw, float* db, int64_t rows,
                              int64_t dim, int64_t out_dim, int threads) {
  const int64_t D = dim, Hd = out_dim, hp = padded(Hd), dp = padded(D);
  const int64_t slots = row_slots(rows, threads);
  const int64_t per_slot = linear_backward_scratch(D, Hd);
  float* ws = workspace(hp * dp + slots * per_slot);
  float* wp = ws;  // W: K = Hd, N = D
  float* scratch = wp + hp * dp;
  pack_parallel(w, D, 1, Hd, D, wp, threads);
  MlpArgs a{};
  a.dim = D, a.hidden = Hd, a.x = x, a.grad_out = grad_out, a.dx = dx, a.w1 = wp;
  a.gamma = norm_weight, a.beta = norm_bias, a.mean = const_cast<float*>(mean), a.rstd = const_cast<float*>(rstd);
  a.addend = addend;
  const auto backward = variant().linear_backward;
  for_each_slot(rows, slots, threads, [&](int64_t s, int64_t r0, int64_t r1) {
    backward(a, r0, r1, scratch + s * per_slot);
  });
  const int64_t dw_at = 2 * kChunk * dp, vectors_at = dw_at + Hd * dp;
  sum_slots(scratch, slots, per_slot, dw_at, Hd, D, dp, dw, threads);
  sum_slots(scratch, slots, per_slot, vectors_at, 1, Hd, hp, db, threads);
  if (norm_weight) {
    sum_slots(scratch, slots, per_slot, vectors_at + hp, 1, D, dp, dnorm_weight, threads);
    sum_slots(scratch, slots, per_slot, vectors_at + hp + dp, 1, D, dp, dnorm_bias, threads);
  }
}

}  // namespace mvmae_fast
