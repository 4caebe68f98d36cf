// The Python bindings of every CPU kernel in this folder (kernels/cpu_ext.py builds them).
#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "paged decode attention on CPU (fp32 softmax)");
}
