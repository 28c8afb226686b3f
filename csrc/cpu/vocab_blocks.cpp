// The block products of the CPU kernel, and the argument checks of its entry points.
#include <algorithm>

#include <ATen/ops/mm.h>

#include "logits.h"

namespace dpo_fast::cpu {

namespace {
// A 16-bit weight's float32 copy of one block (n x H) holds about kUpcastElements (16 MiB), a
// (C x n) scratch about kScratchElements (8 MiB), and a block at least kMinColumns columns, so that
// a very wide head or chunk still makes products of a useful size.
constexpr int64_t kUpcastElements = int64_t{1} << 22;
constexpr int64_t kScratchElements = int64_t{1} << 21;
constexpr int64_t kMinColumns = 512;

int64_t columns_within(int64_t elements, int64_t other_side) {
  return std::max(elements / std::max(other_side, int64_t{1}), kMinColumns);
}
}  // namespace

VocabBlocks::VocabBlocks(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& rows,
                         bool into_scratch)
    : hidden_rows(hidden.index_select(0, rows).to(at::toOpMathType(hidden.scalar_type()))), weight(weight) {
  // Otherwise one product: measured on a 2-core x86 CPU, ATen's (262 x 512) @ (512 x 32000) runs
  // 20% slower as four products of 8192 columns, 50% slower as eight.
  size = std::max(weight.size(0), int64_t{1});
  if (weight.scalar_type() != hidden_rows.scalar_type()) size = std::min(size, columns_within(kUpcastElements, weight.size(1)));
  if (into_scratch) size = std::min(size, columns_within(kScratchElements, hidden_rows.size(0)));
}

void VocabBlocks::logits(int64_t start, at::Tensor out) const {
  at::Tensor block = weight.narrow(0, start, out.size(1));
  if (block.scalar_type() != out.scalar_type()) block = block.to(out.scalar_type());
  at::mm_out(out, hidden_rows, block.t());
}

void check_chunk(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                 const at::Tensor& rows, const at::Tensor& targets) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu(),
              "the cpp backend takes CPU tensors; got hidden on ", hidden.device(), " and weight on ",
              weight.device(), " (use backend='cuda' or 'triton' for CUDA tensors)");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "hidden (N, H) and weight (V, H) must share H; got ", hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), "weight must have hidden's dtype ",
              hidden.scalar_type(), ", got ", weight.scalar_type());
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->device().is_cpu()),
              "bias must be a CPU tensor of shape (V,) = (", weight.size(0), ",)");
  TORCH_CHECK(rows.scalar_type() == at::kLong && targets.scalar_type() == at::kLong && rows.dim() == 1 &&
                  targets.sizes() == rows.sizes(),
              "rows and targets must be int64 tensors of one shape (C,); got ", rows.sizes(), " ",
              rows.scalar_type(), " and ", targets.sizes(), " ", targets.scalar_type());
}

}  // namespace dpo_fast::cpu
