// The head of the CUDA kernels: z from x = h W^T (+ b), and its derivative. See row_kernels.h.
#pragma once

#include "row_kernels.h"

namespace dpo_fast::cuda {

__device__ __forceinline__ float apply_head(float x, const float* bias, int64_t v, const Head& head) {
  if (bias != nullptr) x += bias[v];
  if (head.has_softcap) x = head.softcap * tanhf(x / head.softcap);
  return x * head.inv_temperature;
}

// dz/dx at the logit z: (1 - tanh^2) / temperature, tanh = z * temperature / softcap.
__device__ __forceinline__ float head_derivative(float z, const Head& head) {
  if (!head.has_softcap) return head.inv_temperature;
  const float tanh = z / (head.inv_temperature * head.softcap);
  return (1.0f - tanh * tanh) * head.inv_temperature;
}

}  // namespace dpo_fast::cuda
