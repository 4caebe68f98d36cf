// The Python bindings of every CPU kernel in this folder (kernels/cpu_ext.py builds them).
#include "ops.h"

// The build passes -DSPLITSERVE_SOURCE_DIGEST_RAW=<hex> (no quotes: build tools differ in how
// they pass quoted defines through a shell).
#define SPLITSERVE_STR_(x) #x
#define SPLITSERVE_STR(x) SPLITSERVE_STR_(x)
#ifdef SPLITSERVE_SOURCE_DIGEST_RAW
#define SPLITSERVE_SOURCE_DIGEST SPLITSERVE_STR(SPLITSERVE_SOURCE_DIGEST_RAW)
#else
#define SPLITSERVE_SOURCE_DIGEST ""
#endif

// The kernels run without the GIL (as torch's own operators do): they touch no Python object
// once pybind11 has converted their arguments, and while one runs, the process's other
// Python threads (a worker's gRPC streams, its heartbeats) go on, on the cores the kernel
// leaves free, instead of waiting for the kernel to return.
using ReleaseGil = py::call_guard<py::gil_scoped_release>;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // kernels/build_spec.py's digest of the sources this build was made from (set by the
  // build; kernels/cpu_ext.py refuses an ahead-of-time build whose sources have changed).
  m.attr("source_digest") = SPLITSERVE_SOURCE_DIGEST;
  m.def("paged_decode_attention", &paged_decode_attention, ReleaseGil(),
        "paged decode attention on CPU (fp32 softmax)");
  m.def("rotary_store_kv_", &rotary_store_kv_, ReleaseGil(),
        "rope on the q and k heads of qkv in place, then k and v into the KV cache");
  m.def("silu_and_mul", &silu_and_mul, ReleaseGil(),
        "out = silu(gate_up[:, :n]) * gate_up[:, n:]");
  m.def("rms_norm", &rms_norm, ReleaseGil(), "out = RMSNorm(x) * weight");
  m.def("add_rms_norm_", &add_rms_norm_, ReleaseGil(),
        "residual += x, then x = RMSNorm(residual) * weight, in place");
  m.def("gemm_supported", &gemm_supported, "whether linear_packed works in this build");
  m.def("gemm_bf16_supported", &gemm_bf16_supported,
        "whether linear_packed takes bf16 weights in this build (AVX512-BF16 or AVX2)");
  m.def("gemm_isa", &gemm_isa,
        "the instructions linear_packed runs on for fp32 (false) or bf16 (true) weights: "
        "avx512, avx512_bf16, avx2, or none");
  m.def("pack_linear_weight", &pack_linear_weight, ReleaseGil(),
        "fp32 [N, K] -> panels [ceil(N/16), K, 16]; bf16 -> [ceil(N/16), K/2, 16, 2]");
  m.def("linear_packed", &linear_packed, ReleaseGil(),
        "out = x @ W^T (+ bias) on a packed fp32 weight");
  m.def("decode_layer_", &decode_layer_, ReleaseGil(),
        "one decoder layer of a decode-only step: the fused path's kernels in one call");
}
