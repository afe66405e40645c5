// torch op prefix_grouper::group_normalize: the CUDA backend of prefix_grouper.advantages.
//
// Python (prefix_grouper/advantages/cuda_impl.py) sorts and compacts the group ids and
// passes the segments; this file only checks the tensors and launches the kernel
// (segmented_stats.cuh, instantiated in segmented_stats.cu).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "segmented_stats.h"

namespace prefix_grouper {
namespace {

at::Tensor group_normalize_cuda(const at::Tensor& values, const std::optional<at::Tensor>& perm,
                                const at::Tensor& offsets, const std::optional<at::Tensor>& batch_scale,
                                int64_t scale, double eps, bool unbiased, bool singleton_raw) {
  TORCH_CHECK(values.is_cuda() && values.dim() == 1 && values.is_contiguous(),
              "group_normalize: values must be a contiguous 1-D CUDA tensor, got ", values.sizes());
  TORCH_CHECK(offsets.device() == values.device() && offsets.scalar_type() == at::kLong &&
                  offsets.dim() == 1 && offsets.numel() >= 1 && offsets.is_contiguous(),
              "group_normalize: offsets must be contiguous int64 [G+1] on the device of values");
  TORCH_CHECK(scale >= 0 && scale <= 2, "group_normalize: scale code must be 0 (group), 1 (batch) or 2 (none)");
  if (perm.has_value()) {
    TORCH_CHECK(perm->device() == values.device() && perm->scalar_type() == at::kLong &&
                    perm->numel() == values.numel() && perm->is_contiguous(),
                "group_normalize: perm must be contiguous int64 [N] on the device of values");
  }
  const bool by_batch = scale == static_cast<int64_t>(Scale::kBatch);
  TORCH_CHECK(!by_batch || (batch_scale.has_value() && batch_scale->numel() == offsets.numel() - 1 &&
                            batch_scale->device() == values.device() && batch_scale->is_contiguous() &&
                            batch_scale->scalar_type() == values.scalar_type()),
              "group_normalize: scale=batch needs batch_scale, contiguous [G] (the batch std of every "
              "segment) of the dtype and on the device of values");

  const c10::cuda::CUDAGuard guard(values.device());
  at::Tensor out = at::empty_like(values);
  const NormalizeOptions options{static_cast<Scale>(scale), unbiased, singleton_raw, eps};
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "group_normalize", [&] {
    const cudaError_t status = launch_group_normalize<scalar_t>(
        values.data_ptr<scalar_t>(), perm.has_value() ? perm->data_ptr<int64_t>() : nullptr,
        offsets.data_ptr<int64_t>(), values.numel(), offsets.numel() - 1,
        by_batch ? batch_scale->data_ptr<scalar_t>() : nullptr, options, out.data_ptr<scalar_t>(),
        c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(status == cudaSuccess, "group_normalize: kernel launch failed: ", cudaGetErrorString(status));
  });
  return out;
}

}  // namespace

// FRAGMENT, so that other sources of the extension may register ops in the same namespace.
TORCH_LIBRARY_FRAGMENT(prefix_grouper, m) {
  m.def(
      "group_normalize(Tensor values, Tensor? perm, Tensor offsets, Tensor? batch_scale, int scale, "
      "float eps, bool unbiased, bool singleton_raw) -> Tensor");
}

TORCH_LIBRARY_IMPL(prefix_grouper, CUDA, m) { m.impl("group_normalize", &group_normalize_cuda); }

}  // namespace prefix_grouper
