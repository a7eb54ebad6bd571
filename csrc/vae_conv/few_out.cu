// Host launcher of the VAE decoder's output convolution (conv3d_few_out.cuh): checks, grid, shared memory.
#include "conv3d_few_out.cuh"
#include "vae_conv.h"

namespace oasis_vae {

namespace {

// a start and strides (in elements) of 16-byte steps, as cp.async reads them; a dimension of size 1 is never
// stepped along
bool aligned16(const void* ptr, const int64_t* strides, const int* sizes, int n) {
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
    for (int i = 0; i < n; ++i)
        if (sizes[i] > 1 && strides[i] % 8 != 0) return false;
    return true;
}

}  // namespace

bool few_out_takes(int cin, int cout) {
    return cin >= 16 && cin <= 4096 && cin % 16 == 0 && cout >= 1 && cout <= few_out::kMaxCout;
}

cudaError_t conv3d_few_out(const FewOutCall& c, cudaStream_t stream) {
    if (!few_out_takes(c.cin, c.cout) || c.B < 1 || c.T < 1 || c.H < 1 || c.W < 1) return cudaErrorInvalidValue;
    const int64_t xs[4] = {c.x.sb, c.x.st, c.x.sh, c.x.sw};
    const int xn[4] = {c.B, c.T, c.H, c.W};
    if (!aligned16(c.x.ptr, xs, xn, 4)) return cudaErrorInvalidValue;
    if (c.prev.ptr != nullptr) {
        const int64_t ps[4] = {c.prev.sb, c.prev.st, c.prev.sh, c.prev.sw};
        const int pn[4] = {c.B, 2, c.H, c.W};
        if (!aligned16(c.prev.ptr, ps, pn, 4)) return cudaErrorInvalidValue;
    }
    FewOutParams p;
    p.x = static_cast<const __nv_bfloat16*>(c.x.ptr);
    p.x_sb = c.x.sb; p.x_st = c.x.st; p.x_sh = c.x.sh; p.x_sw = c.x.sw;
    p.prev = static_cast<const __nv_bfloat16*>(c.prev.ptr);
    p.p_sb = c.prev.sb; p.p_st = c.prev.st; p.p_sh = c.prev.sh; p.p_sw = c.prev.sw;
    p.weight = static_cast<const uint2*>(c.weight);
    p.bias = c.bias;
    p.out = static_cast<__nv_bfloat16*>(c.out);
    p.o_sb = c.o_sb; p.o_sc = c.o_sc; p.o_st = c.o_st; p.o_sh = c.o_sh; p.o_sw = c.o_sw;
    p.B = c.B; p.T = c.T; p.H = c.H; p.W = c.W; p.cin = c.cin; p.cout = c.cout;
    p.tiles_w = (c.W + few_out::kOut - 1) / few_out::kOut;
    p.tiles_h = (c.H + few_out::kRows - 1) / few_out::kRows;
    const int64_t blocks = int64_t(c.B) * c.T * p.tiles_h * p.tiles_w;
    if (blocks >= (int64_t(1) << 31) - 1) return cudaErrorInvalidValue;
    // on every launch: the attribute is the current device's, and a process may launch on several (~1 us)
    const cudaError_t attribute =
        cudaFuncSetAttribute(conv3d_few_out_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, few_out::kSmemBytes);
    if (attribute != cudaSuccess) return attribute;
    conv3d_few_out_kernel<<<unsigned(blocks), few_out::kThreads, few_out::kSmemBytes, stream>>>(p);
    return cudaGetLastError();
}

}  // namespace oasis_vae
