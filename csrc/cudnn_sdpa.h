// cuDNN's fused attention (the cuDNN frontend's SDPA graphs) writing straight into strided
// outputs: the routed tensors' head slices, so the dense backend needs no stores after it
// (docs/PERF.md, entry 13: at S the stores of PyTorch's cuDNN path cost 21-33 us per step).
//
// Built only where the cuDNN frontend headers are found (setup.py defines
// OASIS_WITH_CUDNN_FRONTEND); without them both calls decline.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace oasis {

// Whether this build has the cuDNN frontend path.
bool cudnn_sdpa_built();

// Why this thread's last call declined ("" after a call that ran).
std::string cudnn_sdpa_last_decline();

// q, k, v, o: [B, h, N, D] views (fp16 or bf16, any strides with a unit stride on D, 16-byte
// aligned); lse: [B, h, N, 1] float32 view (16-byte aligned), the natural-log log-sum-exp.
// Returns false (and does nothing) where the call is declined: sizes that do not agree, a layout
// or alignment cuDNN's graphs do not take, an exception the frontend throws while building
// (remembered per layout, except failures of the last build step); cudnn_sdpa_last_decline()
// says why. Raises on CUDA or cuDNN errors during execution.
bool cudnn_sdpa_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& o,
                        const at::Tensor& lse, double scale);

// The gradients of the above into dq, dk, dv ([B, h, N, D] views); dout must have o's strides
// (this path's restriction). lse may be any [B, h, N, 1] view: it is made packed and aligned.
bool cudnn_sdpa_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& o, const at::Tensor& lse, const at::Tensor& dq, const at::Tensor& dk,
                         const at::Tensor& dv, double scale);

}  // namespace oasis
