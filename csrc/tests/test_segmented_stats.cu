// Standalone check of segmented_stats.cuh (no torch): the kernel against a double-precision
// CPU loop, for float and double, every scale, both singleton rules, sorted and permuted
// rows, NaN values and singleton segments (which keep their value under every scale). Built and registered with ctest by CMakeLists.txt.
// Exit code 0: pass; 1: mismatch or CUDA error; 77: no CUDA device (ctest reports a skip).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

#include "segmented_stats.cuh"

namespace {

using prefix_grouper::NormalizeOptions;
using prefix_grouper::Scale;

#define CHECK_CUDA(call)                                                                 \
  do {                                                                                   \
    const cudaError_t status_ = (call);                                                  \
    if (status_ != cudaSuccess) {                                                        \
      std::fprintf(stderr, "%s failed: %s\n", #call, cudaGetErrorString(status_));      \
      std::exit(1);                                                                      \
    }                                                                                    \
  } while (0)

struct Problem {
  std::vector<double> values;    // [N], NaN = missing
  std::vector<int64_t> perm;     // [N] rows in segment order
  std::vector<int64_t> offsets;  // [G+1]
};

// Segments of random sizes (1 = singleton, plus a long one to exercise the lane loops).
Problem make_problem(std::mt19937_64& rng, bool permuted) {
  std::uniform_int_distribution<int> size_of(1, 70);
  std::normal_distribution<double> reward(3.0, 2.0);
  std::uniform_real_distribution<double> coin(0.0, 1.0);
  Problem p;
  p.offsets.push_back(0);
  for (int g = 0; g < 300; ++g) {
    const int size = g == 7 ? 5000 : size_of(rng);
    p.offsets.push_back(p.offsets.back() + size);
  }
  const int64_t n = p.offsets.back();
  p.values.resize(n);
  for (double& v : p.values) v = coin(rng) < 0.05 ? NAN : reward(rng);
  p.perm.resize(n);
  std::iota(p.perm.begin(), p.perm.end(), 0);
  if (permuted) std::shuffle(p.perm.begin(), p.perm.end(), rng);
  return p;
}

double batch_std(const std::vector<double>& values, bool unbiased) {
  double count = 0, sum = 0, m2 = 0;
  for (double v : values) if (!std::isnan(v)) { count += 1; sum += v; }
  const double mean = sum / std::max(count, 1.0);
  for (double v : values) if (!std::isnan(v)) m2 += (v - mean) * (v - mean);
  return count >= 2 ? std::sqrt(m2 / (unbiased ? count - 1 : count)) : 1.0;
}

std::vector<double> reference(const Problem& p, const NormalizeOptions& o, double batch_scale) {
  std::vector<double> out(p.values.size(), 0.0);
  for (size_t g = 0; g + 1 < p.offsets.size(); ++g) {
    double count = 0, sum = 0, m2 = 0;
    for (int64_t i = p.offsets[g]; i < p.offsets[g + 1]; ++i) {
      const double v = p.values[p.perm[i]];
      if (!std::isnan(v)) { count += 1; sum += v; }
    }
    const double mean = sum / std::max(count, 1.0);
    for (int64_t i = p.offsets[g]; i < p.offsets[g + 1]; ++i) {
      const double v = p.values[p.perm[i]];
      if (!std::isnan(v)) m2 += (v - mean) * (v - mean);
    }
    const bool singleton = count == 1;
    const double center = singleton && o.singleton_raw ? 0.0 : mean;
    double denominator = 1.0;
    if (o.scale == Scale::kGroup) {
      const double dof = std::max(o.unbiased ? count - 1 : count, 1.0);
      denominator = (singleton ? 1.0 : std::sqrt(m2 / dof)) + o.eps;
    } else if (o.scale == Scale::kBatch) {
      denominator = (singleton ? 1.0 : batch_scale) + o.eps;  // a singleton: std 1 under every scale
    }
    for (int64_t i = p.offsets[g]; i < p.offsets[g + 1]; ++i) {
      const int64_t row = p.perm[i];
      const double v = p.values[row];
      out[row] = std::isnan(v) || (singleton && !o.singleton_raw) ? 0.0 : (v - center) / denominator;
    }
  }
  return out;
}

template <typename T>
T* to_device(const std::vector<T>& host) {
  T* device = nullptr;
  CHECK_CUDA(cudaMalloc(&device, host.size() * sizeof(T)));
  CHECK_CUDA(cudaMemcpy(device, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return device;
}

template <typename T>
int run_case(const Problem& p, const NormalizeOptions& o, bool permuted, double tolerance) {
  const int64_t n = static_cast<int64_t>(p.values.size());
  const int64_t groups = static_cast<int64_t>(p.offsets.size()) - 1;
  const double batch = batch_std(p.values, o.unbiased);
  const std::vector<T> values(p.values.begin(), p.values.end());
  const std::vector<T> batch_host(groups, static_cast<T>(batch));  // every segment in one batch
  T* d_values = to_device(values);
  T* d_batch = to_device(batch_host);
  int64_t* d_perm = permuted ? to_device(p.perm) : nullptr;
  int64_t* d_offsets = to_device(p.offsets);
  T* d_out = nullptr;
  CHECK_CUDA(cudaMalloc(&d_out, n * sizeof(T)));
  CHECK_CUDA(prefix_grouper::launch_group_normalize<T>(d_values, d_perm, d_offsets, n, groups, d_batch, o,
                                                       d_out, nullptr));
  std::vector<T> out(n);
  CHECK_CUDA(cudaMemcpy(out.data(), d_out, n * sizeof(T), cudaMemcpyDeviceToHost));
  for (void* ptr : {static_cast<void*>(d_values), static_cast<void*>(d_batch), static_cast<void*>(d_perm),
                    static_cast<void*>(d_offsets), static_cast<void*>(d_out)}) {
    CHECK_CUDA(cudaFree(ptr));
  }

  const std::vector<double> expected = reference(p, o, batch);
  double worst = 0;
  for (int64_t i = 0; i < n; ++i) {
    worst = std::max(worst, std::abs(static_cast<double>(out[i]) - expected[i]) / (1.0 + std::abs(expected[i])));
  }
  const bool ok = worst <= tolerance;
  std::printf("%-6s scale=%d unbiased=%d singleton_raw=%d permuted=%d: max rel err %.3g %s\n",
              sizeof(T) == 4 ? "float" : "double", static_cast<int>(o.scale), o.unbiased, o.singleton_raw,
              permuted, worst, ok ? "ok" : "FAIL");
  return ok ? 0 : 1;
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device; skipping\n");
    return 77;
  }
  std::mt19937_64 rng(1234);
  int failures = 0;
  for (bool permuted : {false, true}) {
    const Problem p = make_problem(rng, permuted);
    for (Scale scale : {Scale::kGroup, Scale::kBatch, Scale::kNone}) {
      for (bool unbiased : {true, false}) {
        for (bool singleton_raw : {true, false}) {
          const NormalizeOptions o{scale, unbiased, singleton_raw, 1e-6};
          failures += run_case<float>(p, o, permuted, 1e-5);
          failures += run_case<double>(p, o, permuted, 1e-12);
        }
      }
    }
  }
  std::printf("%s\n", failures == 0 ? "all passed" : "FAILED");
  return failures == 0 ? 0 : 1;
}
