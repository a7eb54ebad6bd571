// See copy_rows.h. Plain CUDA (no torch headers): blockIdx.y picks the copy, a grid-stride loop
// over its vectors; the copies are bandwidth-bound, index arithmetic in 32 bits where it fits.
#include "copy_rows.h"

#include <algorithm>

namespace oasis {
namespace {

// Index arithmetic in I: 32 bits when every index of the copy fits (the usual case: five
// divisions per 16-byte vector cost far more in 64 bits), else 64.
template <typename V, typename I>
__device__ void copy_vectors_indexed(const RowCopy& c) {
  const I per_row = static_cast<I>(c.row_bytes / static_cast<int64_t>(sizeof(V)));
  const I n1 = static_cast<I>(c.sizes[1]);
  const I n2 = static_cast<I>(c.sizes[2]);
  const I total = static_cast<I>(c.sizes[0]) * n1 * n2 * per_row;
  const I step = static_cast<I>(gridDim.x) * blockDim.x;
  for (I i = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    I row = i / per_row;
    const I v = i - row * per_row;
    const I z = row % n2;
    row /= n2;
    const I y = row % n1;
    const I x = row / n1;
    const char* src = c.src + x * c.src_strides[0] + y * c.src_strides[1] + z * c.src_strides[2];
    char* dst = c.dst + x * c.dst_strides[0] + y * c.dst_strides[1] + z * c.dst_strides[2];
    reinterpret_cast<V*>(dst)[v] = reinterpret_cast<const V*>(src)[v];
  }
}

template <typename V>
__device__ void copy_vectors(const RowCopy& c) {
  const int64_t total = c.sizes[0] * c.sizes[1] * c.sizes[2] * (c.row_bytes / static_cast<int64_t>(sizeof(V)));
  // the loop index reaches total + step: keep both below 2^31
  if (total + static_cast<int64_t>(gridDim.x) * blockDim.x < (int64_t{1} << 31)) {
    copy_vectors_indexed<V, int32_t>(c);
  } else {
    copy_vectors_indexed<V, int64_t>(c);
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
