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

void check_cpu_chunk(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     const at::Tensor& rows, const at::Tensor& targets) {
  check_chunk(hidden, weight, bias, rows, targets, c10::DeviceType::CPU, "cpp",
              {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
}

}  // namespace dpo_fast::cpu
