// Host-side interface of the LSE-merge and row-sum kernels (attention_merge.cu): what the torch
// ops in flash_merge.cpp, compiled without nvcc, need to launch them.
//
// Both kernels build a [total_rows, H, D] result from parts, each covering a range of its rows.
// One launch takes at most kMaxPartsPerLaunch parts; the ops fold longer lists in over several
// launches, each reading the previous one's running result as its "carry".
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace prefix_grouper {

// The part views travel as kernel arguments (8 merge parts take about 0.6 KiB of the 4 KiB
// parameter space) and every thread keeps a pointer and a weight per part in registers; the
// flash backend merges 2 or 3 parts, so 8 leaves room without costing occupancy.
constexpr int kMaxPartsPerLaunch = 8;

enum class Dtype : int { kFloat16, kBFloat16, kFloat32, kFloat64 };

// Rows [row_start, row_start + rows) of the result: element (r, h, d) of the part is
// data[r * row_stride + h * head_stride + d] (strides in elements; the last dim is contiguous).
struct RowPartView {
  const void* data;
  int64_t row_start;
  int64_t rows;
  int64_t row_stride;
  int64_t head_stride;
};

// A part's float32 natural-log LSE in FlashAttention's varlen layout [H, rows]:
// lse(h, r) = data[h * head_stride + r * row_stride].
struct LseView {
  const float* data;
  int64_t head_stride;
  int64_t row_stride;
};

// lse[t, h] = log(sum_c exp(lse_c) + exp(carry_lse[t, h]) + exp(sinks[h])) over the parts
// covering row t; out[t, h, :] = sum_c exp(lse_c - lse) out_c + exp(carry_lse - lse) carry_out.
// A term whose lse is -inf has weight exactly 0, whatever its out holds.
struct MergeLaunch {
  RowPartView outs[kMaxPartsPerLaunch];  // of in_dtype
  LseView lses[kMaxPartsPerLaunch];
  int num_parts;
  Dtype in_dtype;           // kFloat16, kBFloat16 or kFloat32
  const float* sinks;       // [H], or null
  const float* carry_out;   // [total_rows, H, D] float32 contiguous, or null (no carry)
  const float* carry_lse;   // [total_rows, H], read when carry_out is set; must not alias lse
  void* out;                // [total_rows, H, D] contiguous of out_dtype; may alias carry_out
  Dtype out_dtype;          // kFloat16, kBFloat16 or kFloat32
  float* lse;               // [total_rows, H]
  int64_t total_rows;
  int64_t heads;
  int64_t dim;
};

// out[t, h, :] = carry[t, h, :] + the parts covering row t in order, accumulated in float
// (double for kFloat64 parts, which is then the carry's type too).
struct SumLaunch {
  RowPartView parts[kMaxPartsPerLaunch];  // of in_dtype
  int num_parts;
  Dtype in_dtype;
  const void* carry;  // [total_rows, H, D] contiguous of the accumulation type, or null (zeros)
  void* out;          // [total_rows, H, D] contiguous of out_dtype; may alias carry
  Dtype out_dtype;
  int64_t total_rows;
  int64_t heads;
  int64_t dim;
};

// Launch on `stream`; return the launch status. Nothing runs when total_rows * heads == 0.
cudaError_t launch_merge_attention_partials(const MergeLaunch& launch, cudaStream_t stream);
cudaError_t launch_sum_row_partials(const SumLaunch& launch, cudaStream_t stream);

}  // namespace prefix_grouper
