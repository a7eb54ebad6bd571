// The Wan VAE's 3x3x3 causal convolution in CUDA (conv3d_wgmma.cuh): the host launcher. No torch here:
// these files compile alone with nvcc (tests/test_vae_cuda.py); binding.cpp fills the struct from tensors.
//
// Layouts (strides in elements, unit channel stride; channels-last 3-D as PyTorch's channels_last_3d):
//   x:        [B, Cin, T, H, W]  the frames after the cached ones (bf16)
//   prev:     [B, Cin, 2, H, W]  the two frames before x (the causal cache), or absent: zeros
//   weight:   [Cout, 27 * Cin] bf16 contiguous: tap (dt, dy, dx) = 9 dt + 3 dy + dx, then the input
//             channel
//   bias:     [Cout] float32, or absent
//   residual: [B, Cout, T, H, W], or absent; out: the same, written
//   norm:     [Cout] float32 (the RMS norm's gamma * sqrt(Cout)), or absent; given, out is
//             SiLU(y / max(||y||_C, 1e-12) * norm) of y = conv + bias + residual (Cout 96 or 192 only)
//   tail:     [B, Cout, k, H, W] with 1 <= k <= T, or absent: also given out's last k frames
// out and tail must not overlap x, prev or residual (the kernel reads those while others write)
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace oasis_vae {

struct Conv5d {  // a channels-last 5-D tensor
    const void* ptr;
    int64_t sb, st, sh, sw;  // the channel stride is 1
};

struct ConvCall {
    int B, T, H, W, cin, cout;
    Conv5d x, prev;          // prev.ptr null: no cached frames
    const void* weight;      // packed, see above
    const float* bias;       // or null
    Conv5d residual, out;    // residual.ptr null: none
    const float* norm;       // or null
    Conv5d tail;             // tail.ptr null: none
    int tail_frames;
};

// which output-channel tile a Cout takes (96 or 192), 0 where the kernel has none
int conv_tile_n(int cout);

// the input channels the kernel takes: multiples of 64 from 64 to 1024
bool conv_takes_cin(int cin);

// launches on `stream`; cudaErrorInvalidValue where the kernel has no tile for the channels, a norm is
// asked of more output channels than one tile holds, the tail's frames are out of range or a tensor map
// cannot address a tensor (alignment, strides), else the launch's error
cudaError_t conv3d_k3(const ConvCall& call, cudaStream_t stream);

// The decoder's output convolution (few_out.cu, conv3d_few_out.cuh): y = conv3d(cat([prev or zeros, x], 2))
// + bias for 1 to 5 output channels. x and prev as above (16-byte aligned start and strides: cp.async), the
// weight in the MMA's fragment order (oasis/vae_cuda.py's pack_few_out_weight), out [B, Cout, T, H, W] in any
// strides (written, one bf16 rounding).
struct FewOutCall {
    int B, T, H, W, cin, cout;
    Conv5d x, prev;          // prev.ptr null: no cached frames
    const void* weight;      // [3][3][Cin / 16][2][32] x 4 bf16
    const float* bias;       // or null
    void* out;
    int64_t o_sb, o_sc, o_st, o_sh, o_sw;
};

// the channels the output convolution takes: Cin a multiple of 16 (up to 4096), Cout 1 to 5
bool few_out_takes(int cin, int cout);

// launches on `stream`; cudaErrorInvalidValue where the channels are not taken or x or prev is not 16-byte
// aligned, else the launch's error
cudaError_t conv3d_few_out(const FewOutCall& call, cudaStream_t stream);

// The norm pass (norm_silu.cu): out = SiLU(y / max(||y||_C, eps) * gamma) (SiLU optional) over each position's C
// channels, y = x + bias in float32, or with a residual x + bias + residual rounded to the dtype (and stored into
// sum where given). Every tensor channels-last: position s of batch b at ptr + b * sb + s * C (elements), start and
// batch stride 16-byte aligned; all bf16 (or all fp16). tail: positions from tail_start on are written there too
// (position s at tail + b * t_sb + (s - tail_start) * C). out may be x, sum may be x; nothing else overlaps.
struct NormCall {
    int B, C;
    int64_t positions;       // per batch
    bool half, silu;         // fp16 (else bf16); SiLU after the norm
    const void* x; int64_t x_sb;
    void* out; int64_t o_sb;
    const void* residual; int64_t r_sb;   // or null
    void* sum; int64_t z_sb;              // or null (only with a residual)
    void* tail; int64_t t_sb;             // or null
    int64_t tail_start;
    const float* gamma;      // [C] float32: gamma * scale
    const float* bias;       // [C] float32 or null
    float eps;
};

// the channel counts the pass takes: 24 * 2^k up to 768 (each position's vectors split evenly over 1 to 32 lanes)
bool norm_takes_channels(int channels);

// launches on `stream`; cudaErrorInvalidValue where the channels are not taken, a pointer or batch stride is not
// 16-byte aligned or tail_start is out of range, else the launch's error
cudaError_t norm_silu(const NormCall& call, cudaStream_t stream);

}  // namespace oasis_vae
