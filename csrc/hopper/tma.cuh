// Hopper's asynchronous copies and their barriers, shared by the TMA kernels (../local_attention/forward_tma.cuh
// and ../vae_conv/conv3d_wgmma.cuh): mbarrier phases, TMA box loads completing on a barrier, and the driver's
// tensor-map encoder found through the runtime. No torch here.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "wgmma.cuh"

namespace hopper {

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(wgmma::smem_address(bar)), "r"(count) : "memory");
}

// one arrival that also says how many bytes the phase's copies bring
__device__ __forceinline__ void mbar_expect_bytes(uint64_t* bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(wgmma::smem_address(bar)),
                 "r"(bytes)
                 : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(wgmma::smem_address(bar)) : "memory");
}

// waits until the barrier's phase of parity `parity` has completed; `warp_sync`: the whole warp waits (and
// leaves the loop together, before a warpgroup-wide wgmma), else one thread alone (a producer's)
template <bool warp_sync = true>
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
    uint32_t done = 0;
    while (!done) {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(wgmma::smem_address(bar)), "r"(parity)
            : "memory");
    }
    if constexpr (warp_sync) __syncwarp();
}

// box (c0, c1, c2, c3, c4) of a 5-D tensor map into shared memory, completing on `bar`
__device__ __forceinline__ void load_box5(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2,
                                          int c3, int c4) {
    asm volatile(
        "cp.async.bulk.tensor.5d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, "
        "%6, %7}], [%2];\n" ::"r"(wgmma::smem_address(dst)),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(wgmma::smem_address(bar)), "r"(c0), "r"(c1), "r"(c2), "r"(c3),
        "r"(c4)
        : "memory");
}

// box (c0, c1) of a 2-D tensor map into shared memory, completing on `bar`
__device__ __forceinline__ void load_box2(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], "
        "[%2];\n" ::"r"(wgmma::smem_address(dst)),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(wgmma::smem_address(bar)), "r"(c0), "r"(c1)
        : "memory");
}

// the driver's cuTensorMapEncodeTiled, found once through the runtime (no link to libcuda); null where the
// driver has none
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
    static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
        void* fn = nullptr;
        cudaDriverEntryPointQueryResult found;
#if CUDART_VERSION >= 12050
        const cudaError_t err =
            cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found);
#else
        const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &found);
#endif
        if (err != cudaSuccess || found != cudaDriverEntryPointSuccess) fn = nullptr;
        return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
    }();
    return encode;
}

}  // namespace hopper
