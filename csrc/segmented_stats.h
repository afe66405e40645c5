// Host-side interface of the segmented-statistics kernel (segmented_stats.cuh): what a
// C++ caller compiled without nvcc (the torch op in advantages.cpp) needs to launch it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace prefix_grouper {

enum class Scale : int { kGroup = 0, kBatch = 1, kNone = 2 };

struct NormalizeOptions {
  Scale scale;
  bool unbiased;       // std divides by n-1 (else n)
  bool singleton_raw;  // a segment with exactly one valid value uses mean 0, std 1 under every scale (else 0)
  double eps;          // advantage = (x - mean) / (std + eps); double, so float64 stays exact
};

// out[row] = advantage of values[row] within its segment; see segmented_stats.cuh.
// batch_scale ([num_groups] on the device, the batch std of every segment) is read only for
// Scale::kBatch; perm may be null.
// Instantiated for float and double in segmented_stats.cu.
template <typename T>
cudaError_t launch_group_normalize(const T* values, const int64_t* perm, const int64_t* offsets,
                                   int64_t num_rows, int64_t num_groups, const T* batch_scale,
                                   NormalizeOptions options, T* out, cudaStream_t stream);

}  // namespace prefix_grouper
