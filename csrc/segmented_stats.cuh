// Segmented statistics + normalization of per-row values (GRPO-style group advantages).
//
// Header-only and free of torch, so that the torch op (advantages.cpp, launching the
// instantiations in segmented_stats.cu) and the standalone CUDA unit test (csrc/tests/,
// built by CMake) run exactly the same kernel.
//
// Input layout: segment g holds sorted positions offsets[g] .. offsets[g+1]; the row at
// sorted position i is perm[i] (or i itself when perm is null, i.e. the ids were sorted).
// A team of `lanes` threads (a power of two dividing 32) owns one segment: it reads the
// segment once for count/sum, again for the mean-centered sum of squares (two-pass for
// accuracy; the second read hits L1/L2), and a third time to write advantages.
#pragma once

#include <cstdint>

#include "segmented_stats.h"

namespace prefix_grouper {

template <typename T>
__device__ __forceinline__ T team_sum(T value, int lanes) {
  // xor offsets below `lanes` stay inside each aligned team of the warp.
  for (int offset = lanes / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}

template <typename T>
__device__ __forceinline__ bool is_nan(T x) {
  return x != x;
}

// Launch with blockDim.x a multiple of 32 and at least ceil(num_groups * lanes / blockDim.x)
// blocks; every thread must reach the shuffles, so none returns early.
template <typename T>
__global__ void group_normalize_kernel(const T* __restrict__ values, const int64_t* __restrict__ perm,
                                       const int64_t* __restrict__ offsets, int64_t num_groups,
                                       const T* __restrict__ batch_scale, NormalizeOptions options,
                                       int lanes, T* __restrict__ out) {
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t group = thread / lanes;
  const int lane = static_cast<int>(thread % lanes);
  int64_t begin = 0, end = 0;
  if (group < num_groups) {
    begin = offsets[group];
    end = offsets[group + 1];
  }
  auto row_at = [perm](int64_t position) { return perm != nullptr ? perm[position] : position; };

  T count = 0, sum = 0;
  for (int64_t i = begin + lane; i < end; i += lanes) {
    const T x = values[row_at(i)];
    if (!is_nan(x)) {
      count += T(1);
      sum += x;
    }
  }
  count = team_sum(count, lanes);
  sum = team_sum(sum, lanes);
  const T mean = sum / (count > T(1) ? count : T(1));

  T m2 = 0;
  if (options.scale == Scale::kGroup) {
    for (int64_t i = begin + lane; i < end; i += lanes) {
      const T x = values[row_at(i)];
      if (!is_nan(x)) m2 += (x - mean) * (x - mean);
    }
  }
  m2 = team_sum(m2, lanes);

  const bool singleton = count == T(1);
  const T center = singleton && options.singleton_raw ? T(0) : mean;
  // static_cast<double>(eps) is exact for T = double: float64 advantages see eps unrounded.
  const T eps = static_cast<T>(options.eps);
  T denominator = T(1);
  if (options.scale != Scale::kNone) {
    T std = T(1);  // a singleton is measured against std 1 under every scale
    if (!singleton && options.scale == Scale::kGroup) {
      const T dof = options.unbiased ? count - T(1) : count;
      std = sqrt(m2 / (dof > T(1) ? dof : T(1)));
    } else if (!singleton && group < num_groups) {
      std = batch_scale[group];
    }
    denominator = std + eps;
  }
  const bool zero_out = singleton && !options.singleton_raw;
  for (int64_t i = begin + lane; i < end; i += lanes) {
    const int64_t row = row_at(i);
    const T x = values[row];
    out[row] = is_nan(x) || zero_out ? T(0) : (x - center) / denominator;
  }
}

// Threads per segment: the mean segment length rounded up to a power of two, at most a warp.
inline int lanes_for(int64_t num_rows, int64_t num_groups) {
  const int64_t mean_rows = num_groups > 0 ? (num_rows + num_groups - 1) / num_groups : 1;
  int lanes = 1;
  while (lanes < 32 && lanes < mean_rows) lanes *= 2;
  return lanes;
}

constexpr int kThreadsPerBlock = 256;

template <typename T>
cudaError_t launch_group_normalize(const T* values, const int64_t* perm, const int64_t* offsets,
                                   int64_t num_rows, int64_t num_groups, const T* batch_scale,
                                   NormalizeOptions options, T* out, cudaStream_t stream) {
  if (num_groups == 0) return cudaSuccess;
  const int lanes = lanes_for(num_rows, num_groups);
  const int64_t threads = num_groups * lanes;
  const int64_t blocks = (threads + kThreadsPerBlock - 1) / kThreadsPerBlock;
  group_normalize_kernel<T><<<static_cast<unsigned int>(blocks), kThreadsPerBlock, 0, stream>>>(
      values, perm, offsets, num_groups, batch_scale, options, lanes, out);
  return cudaGetLastError();
}

}  // namespace prefix_grouper
