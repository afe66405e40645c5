// torch ops prefix_grouper::merge_attention_partials and prefix_grouper::sum_row_partials: the
// CUDA backend of prefix_grouper.attention.flash_merge (the LSE merge and the row sums of
// backend="flash" attention).
//
// Python passes the parts as lists; this file checks them, splits them into launches of at
// most kMaxPartsPerLaunch parts and launches the kernels of attention_merge.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "attention_merge.h"

namespace prefix_grouper {
namespace {

// The kernel dtype of `type`, which must be float16, bfloat16, float32 or (where allowed) float64.
Dtype checked_dtype(const char* op, const char* argument, at::ScalarType type, bool allow_float64) {
  switch (type) {
    case at::kHalf:
      return Dtype::kFloat16;
    case at::kBFloat16:
      return Dtype::kBFloat16;
    case at::kFloat:
      return Dtype::kFloat32;
    default:
      TORCH_CHECK(type == at::kDouble && allow_float64, op, ": ", argument, " must be float16, bfloat16",
                  allow_float64 ? ", float32 or float64" : " or float32", ", got ", type);
      return Dtype::kFloat64;
  }
}

struct PartsShape {
  int64_t heads;
  int64_t dim;
  Dtype dtype;
};

// Checks that `parts` (named `name`) are [R_c, H, D] CUDA tensors of one dtype on one device,
// with the same H and D and a contiguous last dim, and that row_starts puts part c on rows
// [row_starts[c], row_starts[c] + R_c) within [0, total_rows).
PartsShape check_row_parts(const char* op, const char* name, at::TensorList parts, at::IntArrayRef row_starts,
                           int64_t total_rows, bool allow_float64) {
  TORCH_CHECK(!parts.empty(), op, ": ", name, " must hold at least one part (it gives H and D)");
  TORCH_CHECK(row_starts.size() == parts.size(), op, ": row_starts has ", row_starts.size(), " entries for ",
              parts.size(), " ", name);
  TORCH_CHECK(total_rows >= 0, op, ": total_rows must be >= 0, got ", total_rows);
  const at::Tensor& first = parts[0];
  TORCH_CHECK(first.is_cuda(), op, ": ", name, "[0] must be a CUDA tensor, got one on ", first.device());
  TORCH_CHECK(first.dim() == 3, op, ": ", name, "[0] must be [R, H, D], got ", first.sizes());
  const Dtype dtype = checked_dtype(op, name, first.scalar_type(), allow_float64);
  for (size_t c = 0; c < parts.size(); ++c) {
    const at::Tensor& part = parts[c];
    TORCH_CHECK(part.device() == first.device(), op, ": ", name, "[", c, "] is on ", part.device(), " but ", name,
                "[0] on ", first.device());
    TORCH_CHECK(part.scalar_type() == first.scalar_type(), op, ": ", name, "[", c, "] is ", part.scalar_type(),
                " but ", name, "[0] ", first.scalar_type());
    TORCH_CHECK(part.dim() == 3 && part.size(1) == first.size(1) && part.size(2) == first.size(2), op, ": ", name,
                "[", c, "] must be [R, H, D] with the H and D of ", name, "[0] ", first.sizes(), ", got ",
                part.sizes());
    TORCH_CHECK(part.size(2) <= 1 || part.stride(2) == 1, op, ": ", name, "[", c,
                "] must have a contiguous last dim, got strides ", part.strides());
    TORCH_CHECK(row_starts[c] >= 0 && row_starts[c] + part.size(0) <= total_rows, op, ": row_starts[", c, "] = ",
                row_starts[c], " puts the ", part.size(0), " rows of ", name, "[", c,
                "] outside [0, total_rows = ", total_rows, ")");
  }
  return {first.size(1), first.size(2), dtype};
}

RowPartView view_of(const at::Tensor& part, int64_t row_start) {
  return {part.const_data_ptr(), row_start, part.size(0), part.stride(0), part.stride(1)};
}

int launch_count(size_t num_parts) {
  return static_cast<int>((num_parts + kMaxPartsPerLaunch - 1) / kMaxPartsPerLaunch);
}

std::tuple<at::Tensor, at::Tensor> merge_attention_partials_cuda(at::TensorList outs, at::TensorList lses,
                                                                 at::IntArrayRef row_starts, int64_t total_rows,
                                                                 const std::optional<at::Tensor>& sinks,
                                                                 at::ScalarType out_dtype) {
  constexpr const char* kOp = "merge_attention_partials";
  const PartsShape shape = check_row_parts(kOp, "outs", outs, row_starts, total_rows, /*allow_float64=*/false);
  const Dtype out_kernel_dtype = checked_dtype(kOp, "out_dtype", out_dtype, /*allow_float64=*/false);
  const at::Device device = outs[0].device();
  TORCH_CHECK(lses.size() == outs.size(), kOp, ": lses has ", lses.size(), " entries for ", outs.size(), " outs");
  for (size_t c = 0; c < lses.size(); ++c) {
    const at::Tensor& lse = lses[c];
    TORCH_CHECK(lse.device() == device, kOp, ": lses[", c, "] is on ", lse.device(), " but outs[0] on ", device);
    TORCH_CHECK(lse.scalar_type() == at::kFloat, kOp, ": lses[", c, "] must be float32, got ", lse.scalar_type());
    TORCH_CHECK(lse.dim() == 2 && lse.size(0) == shape.heads && lse.size(1) == outs[c].size(0), kOp, ": lses[", c,
                "] must be [H, R] = [", shape.heads, ", ", outs[c].size(0), "] like outs[", c, "], got ", lse.sizes());
  }
  if (sinks.has_value()) {
    TORCH_CHECK(sinks->device() == device, kOp, ": sinks is on ", sinks->device(), " but outs[0] on ", device);
    TORCH_CHECK(at::isFloatingType(sinks->scalar_type()), kOp, ": sinks must be floating point, got ",
                sinks->scalar_type());
    TORCH_CHECK(sinks->dim() == 1 && sinks->size(0) == shape.heads, kOp, ": sinks must be [H] = [", shape.heads,
                "], got ", sinks->sizes());
  }

  const c10::cuda::CUDAGuard guard(device);
  const auto options = outs[0].options();
  at::Tensor out = at::empty({total_rows, shape.heads, shape.dim}, options.dtype(out_dtype));
  at::Tensor lse = at::empty({total_rows, shape.heads}, options.dtype(at::kFloat));
  if (total_rows * shape.heads == 0) return {out, lse};

  // Launches before the last write a float32 running merge that the next one folds in: into out
  // itself when it is float32 (each element is read and rewritten by the same thread), else
  // into a scratch buffer. A running lse is read by a whole warp but written by one lane, so it
  // alternates between two buffers, arranged so that the last launch writes lse.
  const int num_launches = launch_count(outs.size());
  const at::Tensor running_out =
      num_launches == 1 || out_dtype == at::kFloat ? out : at::empty(out.sizes(), options.dtype(at::kFloat));
  const at::Tensor lse_buffers[2] = {lse, num_launches == 1 ? lse : at::empty_like(lse)};
  const at::Tensor sinks_float = sinks.has_value() ? sinks->to(at::kFloat).contiguous() : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (int launch_index = 0; launch_index < num_launches; ++launch_index) {
    const size_t first = static_cast<size_t>(launch_index) * kMaxPartsPerLaunch;
    const bool last = launch_index + 1 == num_launches;
    MergeLaunch launch{};
    launch.num_parts = static_cast<int>(std::min<size_t>(outs.size() - first, kMaxPartsPerLaunch));
    for (int c = 0; c < launch.num_parts; ++c) {
      const at::Tensor& part_lse = lses[first + c];
      launch.outs[c] = view_of(outs[first + c], row_starts[first + c]);
      launch.lses[c] = {part_lse.const_data_ptr<float>(), part_lse.stride(0), part_lse.stride(1)};
    }
    launch.in_dtype = shape.dtype;
    launch.sinks = launch_index == 0 && sinks.has_value() ? sinks_float.const_data_ptr<float>() : nullptr;
    if (launch_index > 0) {
      launch.carry_out = running_out.const_data_ptr<float>();
      launch.carry_lse = lse_buffers[(num_launches - launch_index) % 2].const_data_ptr<float>();
    }
    launch.out = last ? out.mutable_data_ptr() : running_out.mutable_data_ptr();
    launch.out_dtype = last ? out_kernel_dtype : Dtype::kFloat32;
    launch.lse = lse_buffers[(num_launches - 1 - launch_index) % 2].mutable_data_ptr<float>();
    launch.total_rows = total_rows;
    launch.heads = shape.heads;
    launch.dim = shape.dim;
    const cudaError_t status = launch_merge_attention_partials(launch, stream);
    TORCH_CHECK(status == cudaSuccess, kOp, ": kernel launch failed: ", cudaGetErrorString(status));
  }
  return {out, lse};
}

at::Tensor sum_row_partials_cuda(at::TensorList parts, at::IntArrayRef row_starts, int64_t total_rows,
                                 at::ScalarType dtype) {
  constexpr const char* kOp = "sum_row_partials";
  const PartsShape shape = check_row_parts(kOp, "parts", parts, row_starts, total_rows, /*allow_float64=*/true);
  const Dtype out_kernel_dtype = checked_dtype(kOp, "dtype", dtype, /*allow_float64=*/true);

  const c10::cuda::CUDAGuard guard(parts[0].device());
  const auto options = parts[0].options();
  at::Tensor out = at::empty({total_rows, shape.heads, shape.dim}, options.dtype(dtype));
  if (total_rows * shape.heads == 0) return out;

  // Launches before the last write the running sum in the accumulation type (float, double for
  // float64 parts): into out itself when it has that type (each element is read and rewritten
  // by the same thread), else into a scratch buffer.
  const int num_launches = launch_count(parts.size());
  const bool float64_parts = shape.dtype == Dtype::kFloat64;
  const at::ScalarType accumulate = float64_parts ? at::kDouble : at::kFloat;
  const at::Tensor running =
      num_launches == 1 || dtype == accumulate ? out : at::empty(out.sizes(), options.dtype(accumulate));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (int launch_index = 0; launch_index < num_launches; ++launch_index) {
    const size_t first = static_cast<size_t>(launch_index) * kMaxPartsPerLaunch;
    const bool last = launch_index + 1 == num_launches;
    SumLaunch launch{};
    launch.num_parts = static_cast<int>(std::min<size_t>(parts.size() - first, kMaxPartsPerLaunch));
    for (int c = 0; c < launch.num_parts; ++c) launch.parts[c] = view_of(parts[first + c], row_starts[first + c]);
    launch.in_dtype = shape.dtype;
    launch.carry = launch_index > 0 ? running.const_data_ptr() : nullptr;
    launch.out = last ? out.mutable_data_ptr() : running.mutable_data_ptr();
    launch.out_dtype = last ? out_kernel_dtype : float64_parts ? Dtype::kFloat64 : Dtype::kFloat32;
    launch.total_rows = total_rows;
    launch.heads = shape.heads;
    launch.dim = shape.dim;
    const cudaError_t status = launch_sum_row_partials(launch, stream);
    TORCH_CHECK(status == cudaSuccess, kOp, ": kernel launch failed: ", cudaGetErrorString(status));
  }
  return out;
}

}  // namespace

// FRAGMENT: the other sources of the extension register ops in the same namespace.
TORCH_LIBRARY_FRAGMENT(prefix_grouper, m) {
  m.def(
      "merge_attention_partials(Tensor[] outs, Tensor[] lses, int[] row_starts, int total_rows, Tensor? sinks, "
      "ScalarType out_dtype) -> (Tensor out, Tensor lse)");
  m.def("sum_row_partials(Tensor[] parts, int[] row_starts, int total_rows, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(prefix_grouper, CUDA, m) {
  m.impl("merge_attention_partials", &merge_attention_partials_cuda);
  m.impl("sum_row_partials", &sum_row_partials_cuda);
}

}  // namespace prefix_grouper
