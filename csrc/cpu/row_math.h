// The per-row math of the CPU kernel: head transform, online logsumexp, dL/dx. Plain C++, no torch.
//
// For one token (one row of logits) with target y, pre-head logits x = h W^T + b and
// z = softcap * tanh(x / softcap) / temperature (softcap optional):
//
//   max_logit        = m = max_v z_v
//   log_sum_exp      = log s,  s = sum_v exp(z_v - m)
//   target_logit     = z_y  (NaN for a target outside [0, V))
//   mean_shifted     = t / s,  t = sum_v exp(z_v - m) (z_v - m)   (E_p[z] - m, for the entropy)
//   mean_logit       = sum_v z_v / V
//   log_sum_sq_probs = log q - 2 log s,  q = sum_v exp(2 (z_v - m))  (log sum_v p_v^2)
//
// computed block by block over the vocabulary (the online logsumexp): when the running max moves
// from m to m' > m, s <- s e^(m - m'), t <- (t + (m - m') s) e^(m - m') and q <- q e^(2 (m - m')).
//
// Non-finite logits: a -inf logit has p = 0 and adds exactly nothing to s, t, q or the gradient
// (never -inf * 0 or -inf - -inf), also in a block whose logits are all -inf; the others' results
// are the exact finite ones. +inf or NaN makes the row's statistics NaN, and so does a row whose
// logits are all -inf (log s = log 0).
//
// The gradient for upstream a = dL/dlogp and e = dL/dentropy, with p_v = exp((z_v - m) - log s):
//
//   dL/dz_v = a (onehot(y)_v - p_v) - e p_v ((z_v - m) - mean_shifted)
//   dL/dx_v = dL/dz_v (1 - (z_v temperature / softcap)^2) / temperature   (softcap factor optional)
//
// The reference for all of it is dpo_fast/backends/reference.py (and torch_chunked.py, which
// forms the same quantities with whole-tensor torch operations).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace dpo_fast::cpu {

// exp(x) for float: Cody-Waite range reduction to [-ln2/2, ln2/2] and Cephes' degree-6 polynomial,
// within 1 ulp of std::exp on [-87.3, 88] (checked on a 1e-4 grid) and branch-free, so that loops
// over it vectorize.
// Below that range the result is 0 (the true value is under 2^-126, about 1e-38), so that exp(-inf)
// is 0; above it, e^88 (arguments here are at most 0). NaN gives NaN.
inline float exp_lanes(float x) {
  const int32_t in_range = x >= -87.33654f;  // 0 below the range, and for NaN (whose p is NaN anyway)
  x = std::min(std::max(x, -87.33654f), 88.0f);
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds a float to an integer
  const float n = (x * 1.44269504088896341f + kRound) - kRound;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n, or 0 below the range: an integer mask, not a branch (GCC would not vectorize one)
  const int32_t bits = ((static_cast<int32_t>(n) + 127) << 23) & -in_range;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline double exp_lanes(double x) { return std::exp(x); }

// max(a, b) by value, a NaN `a` returned as is: std::max returns a reference, and a load through a reference
// chosen at run time keeps GCC from vectorizing the gradient's loop.
template <typename T>
T at_least(T a, T b) {
  return a < b ? b : a;
}

// z = softcap * tanh(x / softcap) / temperature.
template <typename T>
struct Head {
  bool has_softcap;
  T softcap;
  T inv_temperature;

  // dz/dx at the logit z is (1 - tanh^2) / temperature with tanh = z * tanh_per_logit(): the
  // factor is temperature / softcap, or 0 without softcap (no branch in the loops).
  T tanh_per_logit() const { return has_softcap ? T(1) / (inv_temperature * softcap) : T(0); }
};

// Turns x (+ bias) into z in place for n logits; returns their max.
template <typename T>
T apply_head(T* logits, const T* bias, int64_t n, const Head<T>& head) {
  if (bias != nullptr) {
#pragma omp simd
    for (int64_t v = 0; v < n; ++v) logits[v] += bias[v];
  }
  if (head.has_softcap) {
    for (int64_t v = 0; v < n; ++v) logits[v] = head.softcap * std::tanh(logits[v] / head.softcap);
  }
  T block_max = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : block_max)
  for (int64_t v = 0; v < n; ++v) {
    logits[v] *= head.inv_temperature;
    block_max = std::max(block_max, logits[v]);
  }
  return block_max;
}

// The running softmax statistics of one row (see the top of this file).
template <typename T>
struct RowStats {
  T max = -std::numeric_limits<T>::infinity();
  T sum = 0;          // s
  T weighted = 0;     // t
  T sum_squares = 0;  // q
  T sum_logits = 0;   // sum_v z_v

  // Folds in n logits z whose max is block_max; t, q and the sum of logits only when with_metrics.
  void update(const T* z, int64_t n, T block_max, bool with_metrics) {
    if (block_max > max) {
      if (sum > 0) {
        const T shift = max - block_max;
        const T scale = exp_lanes(shift);
        weighted = scale * (weighted + shift * sum);
        sum *= scale;
        sum_squares *= scale * scale;
      }
      max = block_max;
    }
    // Shifted by 0 while every logit so far is -inf: those give e = 0 (-inf - -inf would be NaN).
    const T m = max == -std::numeric_limits<T>::infinity() ? T(0) : max;
    // A -inf logit has e = 0 and, in the product, its shift raised to the lowest finite value, so that
    // e * shift = 0 (not 0 * -inf); NaN stays NaN. (Raising the shift before exp_lanes instead, which
    // needs no such guard, made GCC's loop 3x slower: 7.3 against 2.4 ns a logit on x86-64.)
    constexpr T lowest = std::numeric_limits<T>::lowest();
    T block_sum = 0, block_weighted = 0, block_squares = 0, block_logits = 0;
    if (with_metrics) {
#pragma omp simd reduction(+ : block_sum, block_weighted, block_squares, block_logits)
      for (int64_t v = 0; v < n; ++v) {
        const T shifted = z[v] - m;
        const T e = exp_lanes(shifted);
        block_sum += e;
        block_weighted += e * at_least(shifted, lowest);
        block_squares += e * e;
        block_logits += z[v];
      }
    } else {
#pragma omp simd reduction(+ : block_sum)
      for (int64_t v = 0; v < n; ++v) block_sum += exp_lanes(z[v] - m);
    }
    sum += block_sum;
    weighted += block_weighted;
    sum_squares += block_squares;
    sum_logits += block_logits;
  }
};

// What the gradient of one row needs besides its logits.
template <typename T>
struct RowGrad {
  T max_logit;
  T log_sum_exp;
  T mean_shifted;  // used only when grad_entropy != 0
  T grad_logp;
  T grad_entropy;
};

// dL/dx for n logits z (post-head) of one row, written to grad (which may alias z);
// target is the target's index within these n logits (outside [0, n) when it is not among them).
template <typename T, typename Out>
void row_grad(const T* z, Out* grad, int64_t n, int64_t target, const RowGrad<T>& row, const Head<T>& head) {
  const T m = row.max_logit, lse = row.log_sum_exp, a = row.grad_logp, e = row.grad_entropy;
  const T mean = row.mean_shifted, tanh_per_logit = head.tanh_per_logit(), inv_temperature = head.inv_temperature;
  // Shifts below `floor` have p = 0 (exp_lanes underflows to 0 there): raising a -inf logit's shift
  // to it keeps p = 0 and its term p * (...) = 0, not 0 * -inf. Likewise its tanh factor is 0 without
  // softcap (z is finite with one). NaN stays NaN. (Branch-free, so that the loop vectorizes.)
  const T floor = lse - T(sizeof(T) == sizeof(float) ? 88 : 746);
  constexpr T lowest = std::numeric_limits<T>::lowest();
  const auto grad_at = [&](T logit, T onehot) {
    const T shifted = at_least(logit - m, floor);
    const T p = exp_lanes(shifted - lse);
    const T tanh = at_least(logit, lowest) * tanh_per_logit;
    return static_cast<Out>((onehot - p * (a + e * (shifted - mean))) * (T(1) - tanh * tanh) * inv_temperature);
  };
  const bool has_target = target >= 0 && target < n;
  const T target_logit = has_target ? z[target] : T(0);
#pragma omp simd
  for (int64_t v = 0; v < n; ++v) grad[v] = grad_at(z[v], T(0));
  if (has_target) grad[target] = grad_at(target_logit, a);
}

}  // namespace dpo_fast::cpu
