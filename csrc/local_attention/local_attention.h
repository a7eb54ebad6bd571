// The local heads of a routed attention layer (intra-frame and clipped 3D window) in CUDA:
// parameters and host launchers. No torch here: these files compile alone with nvcc
// (tests/test_cuda_local_compile.py), the binding (binding.cpp) fills the structs from tensors.
//
// Layouts (strides in elements, unit stride on the head dim):
//   q, k, v, out, dout, dq, dk, dv: [B, N, heads, D], N = T*H*W tokens in t-major order
//   lse: [B, heads, N] float32, unit token stride, natural log (the package's format)
//   delta (backward scratch): [B, n_local, N] float32, rowsum(dO * O) per local head
//   heads: n_local int32 head indices, window heads first (a head's position gives its mode)
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace oasis_local {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1 };

// a [B, N, heads, D] tensor
struct View {
    const void* ptr;
    int64_t sb, sn, sh;
};

// the grid, the window radii (clipped to the grid) and the local heads of one launch; the
// kernels skip a head index outside [0, n_heads) (never read or write out of bounds for it)
struct Layer {
    int B, T, H, W, D;
    int rt, rh, rw;
    const int* heads;
    int n_local, n_window;
    int n_heads;  // the heads dimension of the tensors
};

struct ForwardParams {
    Layer layer;
    View q, k, v, out;
    float* lse;
    int64_t lse_sb, lse_sh;
    float scale;
};

struct BackwardParams {
    Layer layer;
    View q, k, v, out, dout, dq, dk, dv;
    const float* lse;
    int64_t lse_sb, lse_sh;
    float* delta;  // [B, n_local, N], written by the launcher's first kernel
    float scale;
};

// The query (key) tile of the window heads: 4 frames of bh x bw tokens, bh * bw = 16 (one warp
// per frame). Chosen per layer by the launchers; exposed for tests and the Python side.
struct TileShape {
    int bh, bw;
};
TileShape window_tile(int H, int W, int rh, int rw, int block_n);

// Each returns cudaSuccess or the launch's error; cudaErrorInvalidValue for a head dim or dtype
// without kernels (64 and 128, float16 and bfloat16).
cudaError_t forward(const ForwardParams& p, DType dtype, cudaStream_t stream);
cudaError_t backward(const BackwardParams& p, DType dtype, cudaStream_t stream);

}  // namespace oasis_local
