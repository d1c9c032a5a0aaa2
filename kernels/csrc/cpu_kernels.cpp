// Fused CPU kernels for the fp32 train step: one memory pass where torch's eager ops need four or more, and
// a causal attention (at the end) that does its products through BLAS against only the keys each block of
// queries sees. Built on first use by kernels/cpu_kernels.py (torch.utils.cpp_extension, cached per machine)
// and registered as torch ops under pretrain_cpu::. fp32, contiguous inputs (attention: the last dimension
// contiguous); the Python side checks and falls back to torch's ops otherwise. Loops over rows in parallel (at::parallel_for, intra-op threads);
// the inner loops are plain arithmetic that the compiler vectorizes (-O3, and -ffast-math so that expf
// becomes the vector math library's SIMD exp).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

namespace {

void check_f32(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "pretrain_cpu: ", what, " must be a contiguous fp32 CPU tensor");
}

constexpr int64_t kGrain = 16;  // rows per parallel task

// 1 / (1 + exp(-x)). The exponent is capped so that exp stays finite: under -ffast-math the division may
// become a reciprocal estimate, which turns an infinite denominator into NaN. At the cap the sigmoid is
// 1.8e-35 instead of smaller: silu(x) = x * sigmoid(x) is off by less than 1e-33 there.
inline float exp_neg(float x) { return expf(std::fmin(-x, 80.0f)); }
// Not inf or NaN, by the exponent bits: std::isfinite is folded to true under -ffinite-math-only.
inline bool finite(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return (bits & 0x7f800000u) != 0x7f800000u;
}
inline float sigmoid(float x) { return 1.0f / (1.0f + exp_neg(x)); }

// out[..., :F] = silu(gate) * up for gate_up = [gate | up] rows of width 2F.
at::Tensor swiglu_forward(const at::Tensor& gate_up) {
  check_f32(gate_up, "gate_up");
  const int64_t two_f = gate_up.size(-1);
  TORCH_CHECK(two_f % 2 == 0, "pretrain_cpu::swiglu_forward: last dimension ", two_f, " is odd");
  const int64_t f = two_f / 2, rows = gate_up.numel() / std::max<int64_t>(two_f, 1);
  auto sizes = gate_up.sizes().vec();
  sizes.back() = f;
  at::Tensor out = at::empty(sizes, gate_up.options());
  const float* in = gate_up.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* g = in + r * two_f;
      const float* u = g + f;
      float* y = o + r * f;
#pragma omp simd
      for (int64_t i = 0; i < f; ++i) {
        const float x = g[i];
        y[i] = x * sigmoid(x) * u[i];
      }
    }
  });
  return out;
}

// d[gate | up] from the forward's input and the output's gradient: d_up = grad * silu(gate),
// d_gate = grad * up * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate))).
at::Tensor swiglu_backward(const at::Tensor& gate_up, const at::Tensor& grad) {
  check_f32(gate_up, "gate_up");
  check_f32(grad, "grad");
  const int64_t two_f = gate_up.size(-1), f = two_f / 2, rows = gate_up.numel() / std::max<int64_t>(two_f, 1);
  TORCH_CHECK(grad.numel() == rows * f, "pretrain_cpu::swiglu_backward: grad has ", grad.numel(),
              " elements, expected ", rows * f);
  at::Tensor out = at::empty_like(gate_up);
  const float* in = gate_up.data_ptr<float>();
  const float* dy = grad.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* g = in + r * two_f;
      const float* u = g + f;
      const float* d = dy + r * f;
      float* dg = o + r * two_f;
      float* du = dg + f;
#pragma omp simd
      for (int64_t i = 0; i < f; ++i) {
        const float x = g[i];
        const float e = exp_neg(x), s = 1.0f / (1.0f + e);
        du[i] = d[i] * x * s;
        // 1 - sigmoid(x) as e * s: computed as a difference it cancels for large x (1 - s is then one
        // rounding of 1, 6e-8, where the true value is exp(-x)), which x multiplies
        dg[i] = d[i] * u[i] * s * (1.0f + x * e * s);
      }
    }
  });
  return out;
}

// One head vector rotated by the rotate-half convention: y1 = x1 c - sign x2 s, y2 = x2 c + sign x1 s.
inline void rotate(const float* x, float* y, const float* c, const float* s, int64_t half, float sign) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half];
    y[i] = x1 * c[i] - sign * x2 * s[i];
    y[i + half] = x2 * c[i] + sign * x1 * s[i];
  }
}

// The fused projection's q|k|v, packed (S, B, kv, per, hd) with per = q heads per kv head + 2, against
// q (B, S, kv, per - 2, hd), k and v (B, S, kv, hd), all contiguous. Forward (backward = false) reads the
// packed tensor and writes q, k rotated and v copied; backward reads the three gradients and writes the
// packed one, rotated back. cos, sin: (S, hd) tables whose first half is used.
void rope_qkv(at::Tensor packed, at::Tensor q, at::Tensor k, at::Tensor v, const at::Tensor& cos,
              const at::Tensor& sin, bool backward) {
  for (const auto* t : {&packed, &q, &k, &v}) check_f32(*t, "rope_qkv tensor");
  check_f32(cos, "cos");
  check_f32(sin, "sin");
  TORCH_CHECK(packed.dim() == 5, "pretrain_cpu::rope_qkv: packed must be (S, B, kv, per, hd)");
  const int64_t S = packed.size(0), B = packed.size(1), kv = packed.size(2), per = packed.size(3),
                hd = packed.size(4), half = hd / 2, nq = per - 2;
  TORCH_CHECK(hd % 2 == 0 && per >= 3, "pretrain_cpu::rope_qkv: head size must be even and per >= 3");
  TORCH_CHECK(q.numel() == B * S * kv * nq * hd && k.numel() == B * S * kv * hd && v.numel() == k.numel(),
              "pretrain_cpu::rope_qkv: q, k, v sizes do not match the packed tensor");
  TORCH_CHECK(cos.size(0) == S && cos.size(1) == hd && sin.sizes() == cos.sizes(),
              "pretrain_cpu::rope_qkv: cos and sin must be (S, hd)");
  float* p = packed.data_ptr<float>();
  float* qp = q.data_ptr<float>();
  float* kp = k.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const float sign = backward ? -1.0f : 1.0f;
  at::parallel_for(0, S * B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t sb = begin; sb < end; ++sb) {
      const int64_t s = sb / B, b = sb % B;
      const float* c = cp + s * hd;
      const float* sn = sp + s * hd;
      for (int64_t h = 0; h < kv; ++h) {
        float* packed_row = p + (sb * kv + h) * per * hd;
        const int64_t bm = (b * S + s) * kv + h;  // batch-major row of (B, S, kv)
        float* q_row = qp + bm * nq * hd;
        float* k_row = kp + bm * hd;
        float* v_row = vp + bm * hd;
        if (!backward) {
          for (int64_t j = 0; j < nq; ++j) rotate(packed_row + j * hd, q_row + j * hd, c, sn, half, sign);
          rotate(packed_row + nq * hd, k_row, c, sn, half, sign);
          std::copy(packed_row + (nq + 1) * hd, packed_row + (nq + 2) * hd, v_row);
        } else {
          for (int64_t j = 0; j < nq; ++j) rotate(q_row + j * hd, packed_row + j * hd, c, sn, half, sign);
          rotate(k_row, packed_row + nq * hd, c, sn, half, sign);
          std::copy(v_row, v_row + hd, packed_row + (nq + 1) * hd);
        }
      }
    }
  });
}


// 1 / rms of one row: (mean(x^2) + eps)^-1/2.
inline float inv_rms(const float* x, int64_t d, float eps) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < d; ++i) sum += x[i] * x[i];
  return 1.0f / std::sqrt(sum / static_cast<float>(d) + eps);
}

// One row of RMSNorm's backward, y = x r (w sc): out = base + r sc g w - x r^3 sc (sum_i g_i w_i x_i) / d
// (base may be null), and acc += r g x (the gain's gradient before its scale).
inline void rms_row_backward(const float* g, const float* x, const float* w, float r, float sc, int64_t d,
                             const float* base, float* out, float* acc) {
  float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
  for (int64_t i = 0; i < d; ++i) {
    dot += g[i] * w[i] * x[i];
    acc[i] += r * g[i] * x[i];
  }
  const float k = sc * dot * r * r * r / static_cast<float>(d), a = r * sc;
  if (base) {
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) out[i] = base[i] + a * g[i] * w[i] - k * x[i];
  } else {
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) out[i] = a * g[i] * w[i] - k * x[i];
  }
}

// RMSNorm over rows of width d: y = x * rstd * (weight * scale), rstd = (mean(x^2) + eps)^-1/2 (returned
// as (..., 1) for the backward).
std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x, const at::Tensor& weight, double eps,
                                                    double scale) {
  check_f32(x, "x");
  check_f32(weight, "weight");
  const int64_t d = x.size(-1), rows = x.numel() / std::max<int64_t>(d, 1);
  TORCH_CHECK(weight.numel() == d, "pretrain_cpu::rms_norm_forward: weight has ", weight.numel(),
              " elements for rows of ", d);
  at::Tensor y = at::empty_like(x);
  auto stat_sizes = x.sizes().vec();
  stat_sizes.back() = 1;
  at::Tensor rstd = at::empty(stat_sizes, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  float* rp = rstd.data_ptr<float>();
  const float sc = static_cast<float>(scale), ep = static_cast<float>(eps);
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * d;
      float* yr = yp + r * d;
      const float inv = inv_rms(xr, d, ep);
      rp[r] = inv;
      const float k = inv * sc;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) yr[i] = xr[i] * k * wp[i];
    }
  });
  return {y, rstd};
}

// dx = r g w - x r^3 (sum_i g_i w_i x_i) / d and dw = scale * sum over rows of r g x, w = weight * scale.
// dw is summed per thread into its own row of a buffer, then over threads (no atomics, a fixed order
// for a given thread count).
std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad, const at::Tensor& x,
                                                     const at::Tensor& weight, const at::Tensor& rstd,
                                                     double scale) {
  for (const auto* t : {&grad, &x, &weight, &rstd}) check_f32(*t, "rms_norm_backward tensor");
  const int64_t d = x.size(-1), rows = x.numel() / std::max<int64_t>(d, 1);
  TORCH_CHECK(grad.numel() == x.numel() && rstd.numel() == rows && weight.numel() == d,
              "pretrain_cpu::rms_norm_backward: shapes do not match");
  at::Tensor dx = at::empty_like(x);
  const int64_t threads = at::get_num_threads();
  at::Tensor partial = at::zeros({threads, d}, x.options());
  const float* gp = grad.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* rp = rstd.data_ptr<float>();
  float* dxp = dx.data_ptr<float>();
  float* pp = partial.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    float* acc = pp + at::get_thread_num() * d;
    for (int64_t r = begin; r < end; ++r) {
      rms_row_backward(gp + r * d, xp + r * d, wp, rp[r], sc, d, nullptr, dxp + r * d, acc);
    }
  });
  at::Tensor dw = partial.sum(0).mul_(scale);
  return {dx, dw};
}

// The sublayer junctions of kernels.torch_ops, fused (RMSNorm kinds):
//   add_norm       s = residual + f,                  y = RMSNorm(s; in_weight) * scale
//   peri_junction  s = residual + RMSNorm(f; out_w),  y = RMSNorm(s; in_weight) * scale
// Forward in one pass per row (the out norm's output is never stored); returns s, y and the two
// 1/rms statistics (rstd_out empty without an out norm).
std::vector<at::Tensor> junction_forward(const at::Tensor& f, const at::Tensor& residual,
                                         const std::optional<at::Tensor>& out_weight, const at::Tensor& in_weight,
                                         double eps, double scale) {
  check_f32(f, "f");
  check_f32(residual, "residual");
  check_f32(in_weight, "in_weight");
  const bool peri = out_weight.has_value();
  if (peri) check_f32(*out_weight, "out_weight");
  const int64_t d = f.size(-1), rows = f.numel() / std::max<int64_t>(d, 1);
  TORCH_CHECK(residual.sizes() == f.sizes() && in_weight.numel() == d && (!peri || out_weight->numel() == d),
              "pretrain_cpu::junction_forward: shapes do not match");
  at::Tensor s_out = at::empty_like(f), y = at::empty_like(f);
  auto stat_sizes = f.sizes().vec();
  stat_sizes.back() = 1;
  at::Tensor rstd_in = at::empty(stat_sizes, f.options());
  at::Tensor rstd_out = peri ? at::empty(stat_sizes, f.options()) : at::empty({0}, f.options());
  const float* fp = f.data_ptr<float>();
  const float* rp = residual.data_ptr<float>();
  const float* wo = peri ? out_weight->data_ptr<float>() : nullptr;
  const float* wi = in_weight.data_ptr<float>();
  float* sp = s_out.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  float* ri = rstd_in.data_ptr<float>();
  float* ro = peri ? rstd_out.data_ptr<float>() : nullptr;
  const float ep = static_cast<float>(eps), sc = static_cast<float>(scale);
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* fr = fp + r * d;
      const float* rr = rp + r * d;
      float* sr = sp + r * d;
      float* yr = yp + r * d;
      if (peri) {
        const float inv = inv_rms(fr, d, ep);
        ro[r] = inv;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) sr[i] = rr[i] + fr[i] * inv * wo[i];
      } else {
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) sr[i] = rr[i] + fr[i];
      }
      const float inv = inv_rms(sr, d, ep);
      ri[r] = inv;
      const float k = inv * sc;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) yr[i] = sr[i] * k * wi[i];
    }
  });
  return {s_out, y, rstd_out, rstd_in};
}

// Backward of junction_forward: dy (of y) and ds (of s, from the residual stream) in; returns
// d_f, d_residual (the total gradient of s, which is also d_f without an out norm), d_out_weight (empty
// without one) and d_in_weight. Per row: ds_total = ds + RMSNorm'(s)^T dy, then d_f = RMSNorm'(f)^T ds_total.
std::vector<at::Tensor> junction_backward(const at::Tensor& dy, const at::Tensor& ds, const at::Tensor& f,
                                          const at::Tensor& s, const std::optional<at::Tensor>& out_weight,
                                          const at::Tensor& in_weight, const at::Tensor& rstd_out,
                                          const at::Tensor& rstd_in, double scale) {
  for (const auto* t : {&dy, &ds, &f, &s, &in_weight, &rstd_in}) check_f32(*t, "junction_backward tensor");
  const bool peri = out_weight.has_value();
  if (peri) {
    check_f32(*out_weight, "out_weight");
    check_f32(rstd_out, "rstd_out");
  }
  const int64_t d = f.size(-1), rows = f.numel() / std::max<int64_t>(d, 1);
  TORCH_CHECK(dy.numel() == f.numel() && ds.numel() == f.numel() && s.numel() == f.numel() &&
                  rstd_in.numel() == rows && (!peri || rstd_out.numel() == rows),
              "pretrain_cpu::junction_backward: shapes do not match");
  at::Tensor d_total = at::empty_like(f);
  at::Tensor d_f = peri ? at::empty_like(f) : d_total;
  const int64_t threads = at::get_num_threads();
  at::Tensor partial_in = at::zeros({threads, d}, f.options());
  at::Tensor partial_out = at::zeros({peri ? threads : 0, d}, f.options());
  const float* dyp = dy.data_ptr<float>();
  const float* dsp = ds.data_ptr<float>();
  const float* fp = f.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  const float* wo = peri ? out_weight->data_ptr<float>() : nullptr;
  const float* wi = in_weight.data_ptr<float>();
  const float* ro = peri ? rstd_out.data_ptr<float>() : nullptr;
  const float* ri = rstd_in.data_ptr<float>();
  float* dtp = d_total.data_ptr<float>();
  float* dfp = d_f.data_ptr<float>();
  float* pin = partial_in.data_ptr<float>();
  float* pout = peri ? partial_out.data_ptr<float>() : nullptr;
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    const int64_t tid = at::get_thread_num();
    for (int64_t r = begin; r < end; ++r) {
      float* dtr = dtp + r * d;
      // the residual stream's gradient plus what flows back through the next block's input norm
      rms_row_backward(dyp + r * d, sp + r * d, wi, ri[r], sc, d, dsp + r * d, dtr, pin + tid * d);
      if (peri) rms_row_backward(dtr, fp + r * d, wo, ro[r], 1.0f, d, nullptr, dfp + r * d, pout + tid * d);
    }
  });
  at::Tensor d_in_weight = partial_in.sum(0).mul_(scale);
  at::Tensor d_out_weight = peri ? partial_out.sum(0) : at::empty({0}, f.options());
  return {d_f, d_total, d_out_weight, d_in_weight};
}

// The maximum of x[0..n) into *max, and whether every x is finite. Fast math may drop a NaN or inf from the
// maximum (and from a capped exp after it), but not from a plain sum, tested by its bits (finite), which
// -ffinite-math-only cannot fold away.
inline bool finite_max(const float* x, int64_t n, float* max) {
  float m = x[0], total = 0.0f;
#pragma omp simd reduction(max : m) reduction(+ : total)
  for (int64_t k = 0; k < n; ++k) {
    m = std::fmax(m, x[k]);
    total += x[k];
  }
  *max = m;
  return finite(total);
}

// The cross-entropy of a chunk of logit rows, and (compute_grad) its gradient written over the logits.
// logits [c, V] (the whole vocabulary: the caller handles tensor parallelism), labels [c] int64 global ids,
// weights [c]. Per row, while it sits in L1/L2: the maximum, then exp(z - max) and its sum, then the
// gradient w (1 + 2 z_loss lse) softmax - w [k == y]. Returns the rows' w (lse - z_y + z_loss lse^2); a row
// whose label falls outside [vocab_start, vocab_start + V) has no target here: w (lse - max + z_loss lse^2)
// and no one-hot, as model/loss.py's torch path.
at::Tensor cross_entropy_rows(at::Tensor logits, const at::Tensor& labels, const at::Tensor& weights,
                              double z_loss, int64_t vocab_start, bool compute_grad) {
  check_f32(logits, "logits");
  check_f32(weights, "weights");
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "pretrain_cpu::cross_entropy_rows: logits must be [rows, vocab]");
  const int64_t rows = logits.size(0), V = logits.size(1);
  TORCH_CHECK(labels.device().is_cpu() && labels.scalar_type() == at::kLong && labels.is_contiguous() &&
                  labels.numel() == rows && weights.numel() == rows,
              "pretrain_cpu::cross_entropy_rows: labels (contiguous int64) and weights need one entry per row");
  at::Tensor out = at::empty({rows}, logits.options());
  float* zp = logits.data_ptr<float>();
  const int64_t* yp = labels.data_ptr<int64_t>();
  const float* wp = weights.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float zl = static_cast<float>(z_loss);
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* z = zp + r * V;
      float m;
      // A NaN or inf logit makes the row's loss and gradient NaN, as in torch's ops, so that the run's
      // divergence guard sees it.
      if (!finite_max(z, V, &m)) {
        op[r] = std::numeric_limits<float>::quiet_NaN();
        if (compute_grad) std::fill(z, z + V, std::numeric_limits<float>::quiet_NaN());
        continue;
      }
      const int64_t y = yp[r] - vocab_start;
      const bool mine = y >= 0 && y < V;
      const float target = mine ? z[y] - m : 0.0f;
      float sum = 0.0f;
      if (compute_grad) {
#pragma omp simd reduction(+ : sum)
        for (int64_t k = 0; k < V; ++k) {
          const float e = expf(std::fmax(z[k] - m, -87.0f));  // capped, as exp_neg is
          z[k] = e;
          sum += e;
        }
      } else {
#pragma omp simd reduction(+ : sum)
        for (int64_t k = 0; k < V; ++k) sum += expf(std::fmax(z[k] - m, -87.0f));
      }
      const float log_sum = logf(sum), lse = m + log_sum, w = wp[r];
      op[r] = w * (log_sum - target + zl * lse * lse);
      if (compute_grad) {
        const float coef = w * (1.0f + 2.0f * zl * lse) / sum;
#pragma omp simd
        for (int64_t k = 0; k < V; ++k) z[k] *= coef;
        if (mine) z[y] -= w;
      }
    }
  });
  return out;
}

// ------------------------------------------------------------------------------------ causal attention
// Softmax attention with a causal mask, for short sequences on one core's caches: per (batch, head) and
// block of kQBlock queries, the scores against the keys the block can see (the ones before its last row,
// not all of them: causal work is about half), the softmax of each row while it sits in L1/L2, then the
// products, through BLAS's sgemm. torch's CPU flash-attention kernel is 1.2-1.6x slower up to 1,024 tokens
// (bench/block_ops.py, op attention). Forward saves the rows' log-sum-exp; backward recomputes the
// probabilities from it, as flash attention does, so nothing of size S x S is kept between the passes.

// MKL's (or another BLAS's) Fortran sgemm, exported by torch's CPU library on x86; weak, so that the
// kernels still load where it is missing (attention_has_blas() tells the Python side to use SDPA then).
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

bool attention_has_blas() { return sgemm_ != nullptr; }

// Row-major C[m x n] = alpha op(A) op(B) + beta C, where op(A) is m x k and op(B) k x n; lda, ldb, ldc are
// row strides. BLAS is column-major, where a row-major matrix reads as its transpose: C^T = op(B)^T op(A)^T.
inline void matmul(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                   const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const char op_b = tb ? 'T' : 'N', op_a = ta ? 'T' : 'N';
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
  sgemm_(&op_b, &op_a, &ni, &mi, &ki, &alpha, b, &lb, a, &la, &beta, c, &lc);
}

constexpr int64_t kQBlock = 64;  // queries per block: their scores against up to S keys stay in L2

// (B, heads, S, D) with the last dimension contiguous: a pointer and the strides of the first three.
struct HeadView {
  const float* data;
  int64_t sb, sh, ss;
  explicit HeadView(const at::Tensor& t)
      : data(t.data_ptr<float>()), sb(t.stride(0)), sh(t.stride(1)), ss(t.stride(2)) {}
  const float* at(int64_t b, int64_t h) const { return data + b * sb + h * sh; }
};

void check_attention(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 4 && t.stride(3) == 1,
              "pretrain_cpu::causal_attention: ", what,
              " must be a (batch, heads, seq, head_dim) fp32 CPU tensor whose last dimension is contiguous");
  TORCH_CHECK(t.numel() < (int64_t{1} << 31), "pretrain_cpu::causal_attention: ", what, " is too large for sgemm");
}

struct AttentionShape {
  int64_t B, H, Hkv, S, D, group, blocks;
};

AttentionShape attention_shape(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_attention(q, "q");
  check_attention(k, "k");
  check_attention(v, "v");
  TORCH_CHECK(sgemm_ != nullptr, "pretrain_cpu::causal_attention: torch's CPU library exports no sgemm_ here");
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3), Hkv = k.size(1);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(2) == S && k.size(3) == D && Hkv > 0 && H % Hkv == 0,
              "pretrain_cpu::causal_attention: k and v must be (batch, kv_heads, seq, head_dim) like q, with "
              "kv_heads dividing q's heads; got q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  return {B, H, Hkv, S, D, H / Hkv, (S + kQBlock - 1) / kQBlock};
}

// Scores s of one row (n keys visible, e in the block's buffer) -> exp(scale (s - max)), zero past the
// diagonal; returns the sum of those (the caller divides the row's output by it, D numbers instead of e)
// and sets lse. A NaN or inf score makes the row NaN (finite_max).
inline float softmax_row(float* row, int64_t n, int64_t e, float scale, float* lse) {
  float m;
  if (!finite_max(row, n, &m)) {
    std::fill(row, row + e, std::numeric_limits<float>::quiet_NaN());
    *lse = std::numeric_limits<float>::quiet_NaN();
    return *lse;
  }
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float p = expf(std::fmax((row[j] - m) * scale, -87.0f));
    row[j] = p;
    sum += p;
  }
  std::fill(row + n, row + e, 0.0f);
  *lse = m * scale + logf(sum);
  return sum;
}

// q (B, H, S, D), k and v (B, Hkv, S, D), each with its last dimension contiguous -> out (B, H, S, D) in
// (B, S, H, D) memory (as torch's CPU flash kernel returns it: the projection after it reads rows), and
// lse (B, H, S), the natural log of each row's sum of exp(scale s).
std::tuple<at::Tensor, at::Tensor> causal_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, double scale) {
  const AttentionShape a = attention_shape(q, k, v);
  at::Tensor out = at::empty({a.B, a.S, a.H, a.D}, q.options());
  at::Tensor lse = at::empty({a.B, a.H, a.S}, q.options());
  const HeadView qv(q), kv(k), vv(v);
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, a.B * a.H * a.blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(kQBlock * a.S), sums(kQBlock);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (a.H * a.blocks), h = (t / a.blocks) % a.H, r0 = (t % a.blocks) * kQBlock;
      const int64_t rows = std::min(kQBlock, a.S - r0), e = r0 + rows;  // keys 0 .. e-1 are visible
      const float* qp = qv.at(b, h) + r0 * qv.ss;
      const float* kp = kv.at(b, h / a.group);
      matmul(false, true, rows, e, a.D, 1.0f, qp, qv.ss, kp, kv.ss, 0.0f, scores.data(), e);
      for (int64_t j = 0; j < rows; ++j)
        sums[j] = softmax_row(scores.data() + j * e, r0 + j + 1, e, sc, lp + (b * a.H + h) * a.S + r0 + j);
      float* o = op + ((b * a.S + r0) * a.H + h) * a.D;
      matmul(false, false, rows, a.D, e, 1.0f, scores.data(), e, vv.at(b, h / a.group), vv.ss, 0.0f, o, a.H * a.D);
      for (int64_t j = 0; j < rows; ++j) {
        float* o_row = o + j * a.H * a.D;
        const float inv = 1.0f / sums[j];
#pragma omp simd
        for (int64_t d = 0; d < a.D; ++d) o_row[d] *= inv;
      }
    }
  });
  return {out.permute({0, 2, 1, 3}), lse};
}

// Gradients of causal_attention_forward: dq (B, H, S, D) in (B, S, H, D) memory, dk and dv (B, Hkv, S, D)
// in (B, S, Hkv, D) memory. One task per (batch, kv head): the query heads that share a kv head add into
// its dk and dv one after the other.
std::vector<at::Tensor> causal_attention_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                                  const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                                  double scale) {
  const AttentionShape a = attention_shape(q, k, v);
  check_attention(dout, "the output's gradient");
  check_attention(out, "out");
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "pretrain_cpu::causal_attention_backward: out and its gradient must have q's shape");
  check_f32(lse, "lse");
  TORCH_CHECK(lse.numel() == a.B * a.H * a.S, "pretrain_cpu::causal_attention_backward: lse must be (B, H, S)");
  at::Tensor dq = at::empty({a.B, a.S, a.H, a.D}, q.options());
  at::Tensor dk = at::zeros({a.B, a.S, a.Hkv, a.D}, q.options());
  at::Tensor dv = at::zeros({a.B, a.S, a.Hkv, a.D}, q.options());
  const HeadView qv(q), kv(k), vv(v), gv(dout), ov(out);
  const float* lp = lse.data_ptr<float>();
  float* dqp = dq.data_ptr<float>();
  float* dkp = dk.data_ptr<float>();
  float* dvp = dv.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const int64_t kv_row = a.Hkv * a.D;
  at::parallel_for(0, a.B * a.Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p(kQBlock * a.S), dp(kQBlock * a.S);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / a.Hkv, g = t % a.Hkv;
      const float* kp = kv.at(b, g);
      const float* vp = vv.at(b, g);
      float* dk_bg = dkp + (b * a.S * a.Hkv + g) * a.D;
      float* dv_bg = dvp + (b * a.S * a.Hkv + g) * a.D;
      for (int64_t h = g * a.group; h < (g + 1) * a.group; ++h) {
        for (int64_t r0 = 0; r0 < a.S; r0 += kQBlock) {
          const int64_t rows = std::min(kQBlock, a.S - r0), e = r0 + rows;
          const float* qp = qv.at(b, h) + r0 * qv.ss;
          const float* gp = gv.at(b, h) + r0 * gv.ss;
          matmul(false, true, rows, e, a.D, 1.0f, qp, qv.ss, kp, kv.ss, 0.0f, p.data(), e);   // scores
          matmul(false, true, rows, e, a.D, 1.0f, gp, gv.ss, vp, vv.ss, 0.0f, dp.data(), e);  // dO V^T
          for (int64_t j = 0; j < rows; ++j) {
            const int64_t r = r0 + j, n = r + 1;
            const float* g_row = gp + j * gv.ss;
            const float* o_row = ov.at(b, h) + r * ov.ss;
            float delta = 0.0f;  // sum over d of dO o: the softmax backward's row term
#pragma omp simd reduction(+ : delta)
            for (int64_t d = 0; d < a.D; ++d) delta += g_row[d] * o_row[d];
            const float l = lp[(b * a.H + h) * a.S + r];
            float* pr = p.data() + j * e;
            float* dr = dp.data() + j * e;
#pragma omp simd
            for (int64_t c = 0; c < n; ++c) {
              const float prob = expf(std::fmax(pr[c] * sc - l, -87.0f));  // capped as in forward
              pr[c] = prob;
              dr[c] = prob * (dr[c] - delta);
            }
            std::fill(pr + n, pr + e, 0.0f);
            std::fill(dr + n, dr + e, 0.0f);
          }
          // dV[0:e] += P^T dO;  dQ = scale dS K[0:e];  dK[0:e] += scale dS^T Q
          matmul(true, false, e, a.D, rows, 1.0f, p.data(), e, gp, gv.ss, 1.0f, dv_bg, kv_row);
          matmul(false, false, rows, a.D, e, sc, dp.data(), e, kp, kv.ss, 0.0f,
                 dqp + ((b * a.S + r0) * a.H + h) * a.D, a.H * a.D);
          matmul(true, false, e, a.D, rows, sc, dp.data(), e, qp, qv.ss, 1.0f, dk_bg, kv_row);
        }
      }
    }
  });
  return {dq.permute({0, 2, 1, 3}), dk.permute({0, 2, 1, 3}), dv.permute({0, 2, 1, 3})};
}

}  // namespace

TORCH_LIBRARY(pretrain_cpu, m) {
  m.def("swiglu_forward(Tensor gate_up) -> Tensor");
  m.def("swiglu_backward(Tensor gate_up, Tensor grad) -> Tensor");
  m.def("rope_qkv(Tensor(a!) packed, Tensor(b!) q, Tensor(c!) k, Tensor(d!) v, Tensor cos, Tensor sin, "
        "bool backward) -> ()");
  m.def("rms_norm_forward(Tensor x, Tensor weight, float eps, float scale) -> (Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor grad, Tensor x, Tensor weight, Tensor rstd, float scale) -> (Tensor, Tensor)");
  m.def("junction_forward(Tensor f, Tensor residual, Tensor? out_weight, Tensor in_weight, float eps, "
        "float scale) -> Tensor[]");
  m.def("junction_backward(Tensor dy, Tensor ds, Tensor f, Tensor s, Tensor? out_weight, Tensor in_weight, "
        "Tensor rstd_out, Tensor rstd_in, float scale) -> Tensor[]");
  m.def("cross_entropy_rows(Tensor(a!) logits, Tensor labels, Tensor weights, float z_loss, int vocab_start, "
        "bool compute_grad) -> Tensor");
  m.def("attention_has_blas() -> bool");
  m.def("causal_attention_forward(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  m.def("causal_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "float scale) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(pretrain_cpu, CPU, m) {
  m.impl("swiglu_forward", &swiglu_forward);
  m.impl("swiglu_backward", &swiglu_backward);
  m.impl("rope_qkv", &rope_qkv);
  m.impl("rms_norm_forward", &rms_norm_forward);
  m.impl("rms_norm_backward", &rms_norm_backward);
  m.impl("junction_forward", &junction_forward);
  m.impl("junction_backward", &junction_backward);
  m.impl("cross_entropy_rows", &cross_entropy_rows);
  m.impl("causal_attention_forward", &causal_attention_forward);
  m.impl("causal_attention_backward", &causal_attention_backward);
}
// No tensor arguments: registered for every dispatch key.
TORCH_LIBRARY_IMPL(pretrain_cpu, CompositeExplicitAutograd, m) { m.impl("attention_has_blas", &attention_has_blas); }
