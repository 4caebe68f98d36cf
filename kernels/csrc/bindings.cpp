// The Python bindings of every CPU kernel in this folder (kernels/cpu_ext.py builds them).
#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "paged decode attention on CPU (fp32 softmax)");
  m.def("rotary_store_kv_", &rotary_store_kv_,
        "rope on the q and k heads of qkv in place, then k and v into the KV cache");
  m.def("silu_and_mul", &silu_and_mul, "out = silu(gate_up[:, :n]) * gate_up[:, n:]");
  m.def("rms_norm", &rms_norm, "out = RMSNorm(x) * weight");
  m.def("add_rms_norm_", &add_rms_norm_,
        "residual += x, then x = RMSNorm(residual) * weight, in place");
  m.def("gemm_supported", &gemm_supported, "whether linear_packed works in this build");
  m.def("pack_linear_weight", &pack_linear_weight, "fp32 [N, K] -> panels [ceil(N/16), K, 16]");
  m.def("linear_packed", &linear_packed, "out = x @ W^T (+ bias) on a packed fp32 weight");
}
