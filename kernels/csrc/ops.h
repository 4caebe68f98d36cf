// Declarations of the CPU kernels bound in bindings.cpp (one extension module).
#pragma once

#include <torch/extension.h>

// paged_decode_cpu.cpp
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache,
                                     torch::Tensor v_cache, torch::Tensor block_tables,
                                     torch::Tensor context_lens, double scale,
                                     torch::Tensor out);
