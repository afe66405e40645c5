// The LSE-merge and row-sum kernels of prefix_grouper.attention.flash_merge, compiled by nvcc
// without torch headers (fast to build); the torch ops in flash_merge.cpp launch them.
//
// One warp per (row, head) of the result. Every lane reads the same few part LSEs (broadcast
// loads) and derives the same weights, so the lanes never exchange data; each then walks its
// own elements d = lane, lane + 32, ... of the head dim, which keeps the loads of a part
// coalesced and puts no bound on D.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cmath>
#include <type_traits>
#include <utility>

#include "attention_merge.h"

namespace prefix_grouper {
namespace {

constexpr int kWarpSize = 32;
constexpr int kThreadsPerBlock = 256;

// Explicit conversions: torch builds extensions with __CUDA_NO_HALF_CONVERSIONS__.
// widen gives the accumulation type: float, or double for double.
template <typename T>
__device__ __forceinline__ auto widen(T x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(x);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(x);
  } else {
    return x;
  }
}

template <typename Out, typename Acc>
__device__ __forceinline__ Out narrow(Acc x) {
  if constexpr (std::is_same_v<Out, __half>) {
    return __float2half_rn(static_cast<float>(x));
  } else if constexpr (std::is_same_v<Out, __nv_bfloat16>) {
    return __float2bfloat16_rn(static_cast<float>(x));
  } else {
    return static_cast<Out>(x);
  }
}

// Whether `part` covers result row `row`.
__device__ __forceinline__ bool covers(const RowPartView& part, int64_t row) {
  return row >= part.row_start && row < part.row_start + part.rows;
}

// Element 0 of result (row, head) in `part`, which covers the row.
template <typename T>
__device__ __forceinline__ const T* head_in_part(const RowPartView& part, int64_t row, int64_t head) {
  return static_cast<const T*>(part.data) + (row - part.row_start) * part.row_stride + head * part.head_stride;
}

template <typename In, typename Out>
__global__ void __launch_bounds__(kThreadsPerBlock) merge_attention_partials_kernel(const MergeLaunch launch) {
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t pair = thread / kWarpSize;  // row * heads + head
  const int lane = static_cast<int>(thread % kWarpSize);
  if (pair >= launch.total_rows * launch.heads) return;
  const int64_t row = pair / launch.heads;
  const int64_t head = pair % launch.heads;

  // part_lse is -inf where a part does not cover the row or has no keys there; such a part's
  // out may hold anything (NaN included), so it is skipped rather than weighted by 0.
  float part_lse[kMaxPartsPerLaunch];
  const In* part_head[kMaxPartsPerLaunch];
  float max_lse = -INFINITY;
#pragma unroll
  for (int c = 0; c < kMaxPartsPerLaunch; ++c) {
    part_lse[c] = -INFINITY;
    part_head[c] = nullptr;
    if (c < launch.num_parts && covers(launch.outs[c], row)) {
      const LseView& lse_view = launch.lses[c];
      part_lse[c] = lse_view.data[head * lse_view.head_stride + (row - launch.outs[c].row_start) * lse_view.row_stride];
      part_head[c] = head_in_part<In>(launch.outs[c], row, head);
      max_lse = fmaxf(max_lse, part_lse[c]);
    }
  }
  const float carry_lse = launch.carry_out != nullptr ? launch.carry_lse[pair] : -INFINITY;
  const float sink = launch.sinks != nullptr ? launch.sinks[head] : -INFINITY;
  max_lse = fmaxf(max_lse, fmaxf(carry_lse, sink));

  float lse = -INFINITY;  // stays -inf (and out 0) where no term has any weight
  if (max_lse != -INFINITY) {
    float total = expf(carry_lse - max_lse) + expf(sink - max_lse);
#pragma unroll
    for (int c = 0; c < kMaxPartsPerLaunch; ++c) total += expf(part_lse[c] - max_lse);
    lse = max_lse + logf(total);
  }
  float weight[kMaxPartsPerLaunch];
#pragma unroll
  for (int c = 0; c < kMaxPartsPerLaunch; ++c) weight[c] = part_lse[c] != -INFINITY ? expf(part_lse[c] - lse) : 0.0f;
  const float* carry = carry_lse != -INFINITY ? launch.carry_out + pair * launch.dim : nullptr;
  const float carry_weight = carry != nullptr ? expf(carry_lse - lse) : 0.0f;

  Out* out = static_cast<Out*>(launch.out) + pair * launch.dim;
  for (int64_t d = lane; d < launch.dim; d += kWarpSize) {
    float acc = carry != nullptr ? carry_weight * carry[d] : 0.0f;
#pragma unroll
    for (int c = 0; c < kMaxPartsPerLaunch; ++c) {
      if (part_lse[c] != -INFINITY) acc += weight[c] * widen(part_head[c][d]);
    }
    out[d] = narrow<Out>(acc);
  }
  if (lane == 0) launch.lse[pair] = lse;
}

template <typename In, typename Out>
__global__ void __launch_bounds__(kThreadsPerBlock) sum_row_partials_kernel(const SumLaunch launch) {
  using Acc = decltype(widen(std::declval<In>()));
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t pair = thread / kWarpSize;  // row * heads + head
  const int lane = static_cast<int>(thread % kWarpSize);
  if (pair >= launch.total_rows * launch.heads) return;
  const int64_t row = pair / launch.heads;
  const int64_t head = pair % launch.heads;

  bool covered[kMaxPartsPerLaunch];
  const In* part_head[kMaxPartsPerLaunch];
#pragma unroll
  for (int c = 0; c < kMaxPartsPerLaunch; ++c) {
    covered[c] = c < launch.num_parts && covers(launch.parts[c], row);
    part_head[c] = covered[c] ? head_in_part<In>(launch.parts[c], row, head) : nullptr;
  }
  const Acc* carry = launch.carry != nullptr ? static_cast<const Acc*>(launch.carry) + pair * launch.dim : nullptr;
  Out* out = static_cast<Out*>(launch.out) + pair * launch.dim;
  for (int64_t d = lane; d < launch.dim; d += kWarpSize) {
    // In part order after the carry (the earlier parts' sum): the same additions, in the same
    // order, as summing the parts one after another.
    Acc acc = carry != nullptr ? carry[d] : Acc(0);
#pragma unroll
    for (int c = 0; c < kMaxPartsPerLaunch; ++c) {
      if (covered[c]) acc += widen(part_head[c][d]);
    }
    out[d] = narrow<Out>(acc);
  }
}

// visit(T{}) with the storage type T of `dtype`; float64 only where kWithFloat64.
template <bool kWithFloat64, typename Visit>
cudaError_t visit_dtype(Dtype dtype, Visit&& visit) {
  switch (dtype) {
    case Dtype::kFloat16:
      return visit(__half{});
    case Dtype::kBFloat16:
      return visit(__nv_bfloat16{});
    case Dtype::kFloat32:
      return visit(float{});
    case Dtype::kFloat64:
      if constexpr (kWithFloat64) return visit(double{});
      break;
  }
  return cudaErrorInvalidValue;
}

// Blocks of kThreadsPerBlock threads for one warp per (row, head); 0 when there is no pair,
// -1 when they would not fit in a grid.
int64_t blocks_for(int64_t total_rows, int64_t heads) {
  constexpr int64_t kWarpsPerBlock = kThreadsPerBlock / kWarpSize;
  const int64_t blocks = (total_rows * heads + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return blocks <= INT_MAX ? blocks : -1;
}

}  // namespace

cudaError_t launch_merge_attention_partials(const MergeLaunch& launch, cudaStream_t stream) {
  const int64_t blocks = blocks_for(launch.total_rows, launch.heads);
  if (blocks <= 0) return blocks == 0 ? cudaSuccess : cudaErrorInvalidConfiguration;
  return visit_dtype<false>(launch.in_dtype, [&](auto in) {
    return visit_dtype<false>(launch.out_dtype, [&](auto out) {
      merge_attention_partials_kernel<decltype(in), decltype(out)>
          <<<static_cast<unsigned int>(blocks), kThreadsPerBlock, 0, stream>>>(launch);
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_sum_row_partials(const SumLaunch& launch, cudaStream_t stream) {
  const int64_t blocks = blocks_for(launch.total_rows, launch.heads);
  if (blocks <= 0) return blocks == 0 ? cudaSuccess : cudaErrorInvalidConfiguration;
  return visit_dtype<true>(launch.in_dtype, [&](auto in) {
    return visit_dtype<true>(launch.out_dtype, [&](auto out) {
      sum_row_partials_kernel<decltype(in), decltype(out)>
          <<<static_cast<unsigned int>(blocks), kThreadsPerBlock, 0, stream>>>(launch);
      return cudaGetLastError();
    });
  });
}

}  // namespace prefix_grouper
