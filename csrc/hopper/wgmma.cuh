// Hopper warpgroup MMA (wgmma) building blocks for the local-attention and VAE kernels, sm_90a only, no
// torch: shared-memory matrix descriptors for 128-byte-swizzled tiles, the m64n64k16 bf16/fp16 MMA with
// both operands in shared memory (SS: S = Q K^T) and with A in registers and B stored N-major
// (RS: O += P V, V as it lies, keys by head dim), and the fences that order them. The layouts follow
// the PTX ISA's "Matrix Descriptor Format" and "Shared Memory Matrix Layout" sections;
// tests/cuda/wgmma_check.cu checks them against a CPU matmul on the GPU.
#pragma once

#include <cstdint>

namespace wgmma {

// A 128-byte-swizzled tile of 2-byte elements: rows of 64 elements (128 bytes); 8 rows (1024 bytes)
// form one swizzle atom, in which 16-byte chunk c of row r lies at chunk c ^ (r & 7). A tile wider
// than 64 elements is a sequence of such panels, `rows` x 64 each. Tiles must start 1024-byte aligned.
constexpr int kPanel = 64;           // elements per 128-byte row
constexpr int kAtomBytes = 1024;     // 8 rows x 128 bytes

// offset in elements of (row, col) in a swizzled tile of `rows` rows (col may exceed 64: next panel)
__host__ __device__ __forceinline__ int swizzled(int row, int col, int rows) {
    const int panel = col / kPanel, c = col % kPanel;
    return panel * rows * kPanel + row * kPanel + ((((c >> 3) ^ (row & 7))) << 3) + (c & 7);
}

__device__ __forceinline__ uint32_t smem_address(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// descriptor fields: start address >> 4 (bits 0-13), leading byte offset >> 4 (16-29), stride byte
// offset >> 4 (32-45), swizzle mode (62-63; 1 = 128-byte)
__device__ __forceinline__ uint64_t descriptor(const void* tile, uint32_t leading_bytes, uint32_t stride_bytes) {
    const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(tile));
    return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t((leading_bytes >> 4) & 0x3FFF) << 16) |
           (uint64_t((stride_bytes >> 4) & 0x3FFF) << 32) | (uint64_t(1) << 62);
}

// K-major operand of a tile of `rows` rows (A of S = Q K^T, or B = K with keys as N): k-step `ks`
// of 16 elements is 32 bytes into its 64-element panel; 8-row groups are one atom apart
__device__ __forceinline__ uint64_t k_major(const void* tile, int ks, int rows) {
    const int panel = ks / (kPanel / 16), step = ks % (kPanel / 16);
    return descriptor(static_cast<const char*>(tile) + panel * rows * 128 + step * 32, 16, kAtomBytes);
}

// N-major B operand (V with keys as K and the head dim as N, rows of 64 head-dim elements): k-step
// `ks` of 16 keys starts 16 rows further; N panels of 64 are `rows` x 128 bytes apart. In the PTX
// ISA's canonical MN-major 128-byte layout, ((8,8,m),(8,k)) : ((1,8,LBO),(64,SBO)) in elements, the
// leading byte offset steps the N panels and the stride byte offset the 8-row groups of K (the
// K-major layout, ((8,m),(8,2k)) : ((64,SBO),(1,8)), leaves the leading offset unused)
__device__ __forceinline__ uint64_t n_major(const void* tile, int ks, int rows) {
    return descriptor(static_cast<const char*>(tile) + ks * 16 * 128, rows * 128, kAtomBytes);
}

__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// keeps the compiler from moving reads or writes of an accumulator (or A) register across the wgmma
// instructions that own it between their fence and their wait_group (CUTLASS's warpgroup_fence_operand)
__device__ __forceinline__ void fence_operand(float& x) { asm volatile("" : "+f"(x)::"memory"); }
template <int N>
__device__ __forceinline__ void fence_operands(float (&x)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) fence_operand(x[i]);
}

// shared memory written by ordinary stores (or cp.async), read next by wgmma (the async proxy)
__device__ __forceinline__ void fence_smem_for_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// The accumulator of m64n64 (f32) per thread of the warpgroup: d[4j + e] is row
// 16 * warp + lane / 4 (+ 8 for e >= 2), column 8 j + 2 (lane % 4) + (e & 1), j = 0..7.
#define WGMMA_D32(d)                                                                                  \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),   \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),         \
    "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),       \
    "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]),       \
    "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define WGMMA_REGS32                                                                                  \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, " \
    "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"

// the element type of both operands: F16 false is bf16, true fp16 (the instruction's type suffix)
#define WGMMA_M64N64K16(TYPE) "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " "

// d (+)= A B: A 64 x 16 and B 16 x 64 (given as 64 x 16, K-major) from shared memory; `accumulate`
// false overwrites d
template <bool F16 = false>
__device__ __forceinline__ void mma_ss(float (&d)[32], uint64_t a, uint64_t b, bool accumulate) {
    if constexpr (F16)
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n" WGMMA_M64N64K16("f16") WGMMA_REGS32
            ", %32, %33, p, 1, 1, 0, 0;\n}\n"
            : WGMMA_D32(d)
            : "l"(a), "l"(b), "r"(int(accumulate)));
    else
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n" WGMMA_M64N64K16("bf16") WGMMA_REGS32
            ", %32, %33, p, 1, 1, 0, 0;\n}\n"
            : WGMMA_D32(d)
            : "l"(a), "l"(b), "r"(int(accumulate)));
}

// d (+)= A B: A 64 x 16 from registers (each warp its 16 rows, in mma.sync's A fragment layout:
// a[0] rows lane/4, cols 2(lane%4)..+1; a[1] rows +8; a[2] cols +8; a[3] both), B 16 x 64 N-major
// from shared memory (the transpose flag set)
template <bool F16 = false>
__device__ __forceinline__ void mma_rs(float (&d)[32], const uint32_t (&a)[4], uint64_t b, bool accumulate) {
    if constexpr (F16)
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n" WGMMA_M64N64K16("f16") WGMMA_REGS32
            ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
            : WGMMA_D32(d)
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(int(accumulate)));
    else
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n" WGMMA_M64N64K16("bf16") WGMMA_REGS32
            ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
            : WGMMA_D32(d)
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(int(accumulate)));
}

#undef WGMMA_M64N64K16
#undef WGMMA_REGS32
#undef WGMMA_D32

}  // namespace wgmma
