// The float and double launchers of the segmented-statistics kernel, compiled by nvcc without
// torch headers (fast to build); the torch op in advantages.cpp calls them.
#include "segmented_stats.cuh"

namespace prefix_grouper {

template cudaError_t launch_group_normalize<float>(const float*, const int64_t*, const int64_t*, int64_t,
                                                   int64_t, const float*, NormalizeOptions, float*,
                                                   cudaStream_t);
template cudaError_t launch_group_normalize<double>(const double*, const int64_t*, const int64_t*, int64_t,
                                                    int64_t, const double*, NormalizeOptions, double*,
                                                    cudaStream_t);

}  // namespace prefix_grouper
