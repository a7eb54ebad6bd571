// Copies of strided row sets in one launch: the eager replay (eager_routed.cpp) writes cuDNN's
// outputs for a run of global heads into the routed tensors with one launch per pass instead of
// one TensorIterator copy per tensor (each ~10-15 us of host time on the H200's host).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace oasis {

// dst[a, b, c, :] = src[a, b, c, :] for a < sizes[0], b < sizes[1], c < sizes[2]; rows of
// `row_bytes` contiguous bytes, strides in bytes; `vector_bytes` (16, 8, 4, 2 or 1) divides
// row_bytes, both base pointers and every stride.
struct RowCopy {
  const char* src;
  char* dst;
  int64_t sizes[3];
  int64_t src_strides[3];
  int64_t dst_strides[3];
  int64_t row_bytes;
  int32_t vector_bytes;
};

constexpr int kMaxRowCopies = 4;

struct RowCopies {
  RowCopy copy[kMaxRowCopies];
  int32_t count;
};

// Launches one kernel on `stream` for all copies; returns the launch error.
cudaError_t copy_rows(const RowCopies& copies, cudaStream_t stream);

}  // namespace oasis
