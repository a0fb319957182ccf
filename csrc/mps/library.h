// The Metal half of the MPS backend: metalq's kernel library, its pipelines, and the encoder that
// turns a DispatchPlan (csrc/plan.h) into commands on PyTorch's MPS stream.
#pragma once

#include <Metal/Metal.h>

#include <string>

#include "../plan.h"

namespace metalq::mps {

// The pipeline of a kernel in metalq's library, built once per process (thread-safe); TORCH_CHECK
// failure with Metal's error text when the library or the kernel cannot be loaded.
id<MTLComputePipelineState> pipeline(const std::string& kernel);

// Encodes the plan on the current MPS stream's shared encoder, ordered with other torch ops; does not
// commit. The plan's tensors are on MPS; validation and allocation happened before this call.
void encode(const DispatchPlan& plan);

}  // namespace metalq::mps
