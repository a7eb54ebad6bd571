// See copy_rows.h. Plain CUDA (no torch headers): blockIdx.y picks the copy, a grid-stride loop
// over its vectors; the copies are bandwidth-bound, index arithmetic is in 64 bits.
#include "copy_rows.h"

#include <algorithm>

namespace oasis {
namespace {

template <typename V>
__device__ void copy_vectors(const RowCopy& c) {
  const int64_t per_row = c.row_bytes / static_cast<int64_t>(sizeof(V));
  const int64_t total = c.sizes[0] * c.sizes[1] * c.sizes[2] * per_row;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    int64_t row = i / per_row;
    const int64_t v = i - row * per_row;
    const int64_t z = row % c.sizes[2];
    row /= c.sizes[2];
    const int64_t y = row % c.sizes[1];
    const int64_t x = row / c.sizes[1];
    const char* src = c.src + x * c.src_strides[0] + y * c.src_strides[1] + z * c.src_strides[2];
    char* dst = c.dst + x * c.dst_strides[0] + y * c.dst_strides[1] + z * c.dst_strides[2];
    reinterpret_cast<V*>(dst)[v] = reinterpret_cast<const V*>(src)[v];
  }
}

__global__ void copy_rows_kernel(RowCopies copies) {
  const RowCopy& c = copies.copy[blockIdx.y];
  switch (c.vector_bytes) {  // uniform per block
    case 16: copy_vectors<uint4>(c); break;
    case 8: copy_vectors<uint2>(c); break;
    case 4: copy_vectors<uint32_t>(c); break;
    case 2: copy_vectors<uint16_t>(c); break;
    default: copy_vectors<uint8_t>(c); break;
  }
}

}  // namespace

cudaError_t copy_rows(const RowCopies& copies, cudaStream_t stream) {
  if (copies.count <= 0) return cudaSuccess;
  if (copies.count > kMaxRowCopies) return cudaErrorInvalidValue;
  int64_t most = 0;
  for (int i = 0; i < copies.count; ++i) {
    const RowCopy& c = copies.copy[i];
    most = std::max(most, c.sizes[0] * c.sizes[1] * c.sizes[2] * (c.row_bytes / c.vector_bytes));
  }
  if (most == 0) return cudaSuccess;
  constexpr int threads = 256;
  // enough blocks to fill a Hopper's 132 SMs several times over; the loop covers the rest
  const int64_t blocks = std::min<int64_t>((most + threads - 1) / threads, 132 * 8);
  copy_rows_kernel<<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(copies.count)), threads, 0, stream>>>(
      copies);
  return cudaGetLastError();
}

}  // namespace oasis
