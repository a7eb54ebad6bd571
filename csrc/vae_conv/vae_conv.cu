// Host launcher of the VAE's 3x3x3 convolution (conv3d_wgmma.cuh): tensor maps, grid, shared memory.
#include <cudaTypedefs.h>

#include <type_traits>

#include "conv3d_wgmma.cuh"
#include "vae_conv.h"

namespace oasis_vae {

namespace {

using hopper::tensor_map_encoder;

bool encode(CUtensorMap* map, int rank, const void* ptr, const cuuint64_t* dims, const int64_t* strides_el,
            const cuuint32_t* box, int chunk) {
    const auto fn = tensor_map_encoder();
    if (fn == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
    cuuint64_t strides[4];
    for (int i = 0; i < rank - 1; ++i) {
        const int64_t bytes = strides_el[i] * 2;
        if (bytes <= 0 || bytes % 16 != 0 || bytes >= (int64_t(1) << 40)) return false;
        strides[i] = cuuint64_t(bytes);
    }
    const cuuint32_t unit[5] = {1, 1, 1, 1, 1};
    return fn(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, rank, const_cast<void*>(ptr), dims, strides, box, unit,
              CU_TENSOR_MAP_INTERLEAVE_NONE,
              chunk == 64 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_64B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
              CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// a channels-last [B, C, frames, H, W] as the 5-D map (C, W, H, frames, B) of chunk-channel x 64-pixel boxes
bool frames_map(CUtensorMap* map, const Conv5d& v, int B, int C, int frames, int H, int W, int chunk) {
    const cuuint64_t dims[5] = {cuuint64_t(C), cuuint64_t(W), cuuint64_t(H), cuuint64_t(frames), cuuint64_t(B)};
    // a dimension of size 1 is never stepped along: the dense stride stands in for its own (the previous
    // dimension's stride times its size: increasing, as the driver's documentation asks)
    const int64_t sizes[5] = {C, W, H, frames, B}, given[4] = {v.sw, v.sh, v.st, v.sb};
    int64_t strides[4];
    for (int i = 0; i < 4; ++i)
        strides[i] = sizes[i + 1] > 1 ? given[i] : (i == 0 ? 1 : strides[i - 1]) * sizes[i];
    const cuuint32_t box[5] = {cuuint32_t(chunk), detail::kSeg, 1, 1, 1};
    return encode(map, 5, v.ptr, dims, strides, box, chunk);
}

template <int NT, int CHUNK>
cudaError_t launch(const ConvCall& c, cudaStream_t stream) {
    ConvMaps maps;
    if (!frames_map(&maps.x, c.x, c.B, c.cin, c.T, c.H, c.W, CHUNK)) return cudaErrorInvalidValue;
    // without cached frames the map is x's again, never read (the kernel takes zeros instead)
    if (!frames_map(&maps.prev, c.prev.ptr ? c.prev : c.x, c.B, c.cin, c.prev.ptr ? 2 : c.T, c.H, c.W, CHUNK))
        return cudaErrorInvalidValue;
    const cuuint64_t wdims[2] = {cuuint64_t(27) * c.cin, cuuint64_t(c.cout)};
    const int64_t wstride[1] = {int64_t(27) * c.cin};
    const cuuint32_t wbox[2] = {CHUNK, NT};
    if (!encode(&maps.w, 2, c.weight, wdims, wstride, wbox, CHUNK)) return cudaErrorInvalidValue;

    ConvParams p;
    p.B = c.B; p.T = c.T; p.H = c.H; p.W = c.W;
    p.cin = c.cin; p.cout = c.cout;
    p.has_prev = c.prev.ptr != nullptr;
    const int64_t segments = int64_t(c.B) * c.T * c.H * ((c.W + detail::kSeg - 1) / detail::kSeg);
    if (segments >= (int64_t(1) << 31) - 1) return cudaErrorInvalidValue;
    p.segments = int(segments);
    p.bias = c.bias;
    p.residual = static_cast<const __nv_bfloat16*>(c.residual.ptr);
    p.r_sb = c.residual.sb; p.r_st = c.residual.st; p.r_sh = c.residual.sh; p.r_sw = c.residual.sw;
    p.out = static_cast<__nv_bfloat16*>(const_cast<void*>(c.out.ptr));
    p.o_sb = c.out.sb; p.o_st = c.out.st; p.o_sh = c.out.sh; p.o_sw = c.out.sw;
    p.norm = c.norm;
    p.tail = static_cast<__nv_bfloat16*>(const_cast<void*>(c.tail.ptr));
    p.tail_start = c.T - c.tail_frames;
    p.t_sb = c.tail.sb; p.t_st = c.tail.st; p.t_sh = c.tail.sh; p.t_sw = c.tail.sw;

    const size_t smem = detail::Smem<NT, CHUNK>::kBytes;
    auto kernel = conv3d_k3_kernel<NT, CHUNK>;
    // on every launch: the attribute is the current device's, and a process may launch on several (~1 us)
    const cudaError_t attribute = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (attribute != cudaSuccess) return attribute;
    const dim3 grid(unsigned((segments + detail::kConsumers - 1) / detail::kConsumers), unsigned(c.cout / NT));
    kernel<<<grid, detail::kThreads, smem, stream>>>(maps, p);
    return cudaGetLastError();
}

}  // namespace

int conv_tile_n(int cout) {
    if (cout <= 0 || cout % 96 != 0 || cout > 65535 * 96) return 0;
    return cout % 192 == 0 ? 192 : 96;
}

bool conv_takes_cin(int cin) { return cin >= 64 && cin <= 1024 && cin % 64 == 0; }

cudaError_t conv3d_k3(const ConvCall& call, cudaStream_t stream) {
    if (!conv_takes_cin(call.cin) || call.B < 1 || call.T < 1 || call.H < 1 || call.W < 1)
        return cudaErrorInvalidValue;
    if (call.norm != nullptr && conv_tile_n(call.cout) != call.cout) return cudaErrorInvalidValue;
    if (call.tail.ptr != nullptr && (call.tail_frames < 1 || call.tail_frames > call.T)) return cudaErrorInvalidValue;
    if (call.B * int64_t(call.T) * call.H * call.W == 0) return cudaSuccess;
    // 64-channel stages only: the 32-channel ones (Cin = 96) ran at a third of their rate (PERF entry 18j)
    switch (conv_tile_n(call.cout)) {
        case 96: return launch<96, 64>(call, stream);
        case 192: return launch<192, 64>(call, stream);
        default: return cudaErrorInvalidValue;
    }
}

}  // namespace oasis_vae
