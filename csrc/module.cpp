// Python module init of prefix_grouper._C, the one for the whole extension.
//
// The ops register themselves with TORCH_LIBRARY_FRAGMENT(prefix_grouper, ...) when the
// library loads, so they are reached as torch.ops.prefix_grouper.*; this module only has
// to exist so that `import prefix_grouper._C` loads the library.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "prefix_grouper CUDA kernels, registered as torch.ops.prefix_grouper.*";
}
