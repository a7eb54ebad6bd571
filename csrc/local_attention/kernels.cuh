// What the local-attention kernels share (the forward: forward_wgmma.cuh; the backward:
// backward_wgmma.cuh): the PTX wrappers of their loads and exponentials, the loads of a tile's rows, the
// pipelined walk of a tile's blocks, the program's head, and the backward's delta = rowsum(dO * O).
//
// Work split (geometry.cuh; the same as the Triton kernels', oasis_kernels/kernels/tile_geometry.py):
// grid.y runs over (batch, local head), grid.x over the head's primary tiles of 64 rows, four
// warps of 16 rows each. Window tiles are 4 frames x bh x bw tokens, one frame per warp, their
// halo walked one frame per block in slices. Intra tiles are 64 tokens of a frame, walking the
// frame. Each thread keeps its visibility bits per slice (one 32-bit mask) and its load rows'
// offsets per slice; the walk itself divides by nothing. Rows, columns and their tokens: rows of a
// tile that fall outside the grid and positions of a halo outside the grid are loaded as zeros
// (cp.async zero-fill) and masked, never stored. Loads are cp.async, two stages: the next block
// streams in while the current one is computed.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "geometry.cuh"
#include "local_attention.h"

namespace oasis_local {
namespace detail {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// online softmax: a row's running max is updated (and its accumulator rescaled) only when a
// block raises it by more than this (base 2), so most blocks skip the rescale (FlashAttention-3's
// conditional rescaling); unnormalized probabilities stay below 2^8, exact enough in fp32
constexpr float kRescaleSlack = 8.0f;
constexpr float kNegInf = -__builtin_huge_valf();

// ---------------------------------------------------------------------------------------
// PTX wrappers
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared; zero-filled (no read) when !valid
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 4 : 0));
}

// 2^x by the SFU (ex2.approx: ~2 ulp, 2^-inf = 0), as FlashAttention's exp2f under fast math
__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// two floats as one register of two T (x in the low half): the wgmma A fragments' and the stores' pairs
template <typename T>
struct Mma;

template <>
struct Mma<__nv_bfloat16> {
    static __device__ __forceinline__ uint32_t pack(float x, float y) {
        __nv_bfloat162 v = __floats2bfloat162_rn(x, y);  // x in the low half
        return *reinterpret_cast<uint32_t*>(&v);
    }
};

template <>
struct Mma<__half> {
    static __device__ __forceinline__ uint32_t pack(float x, float y) {
        __half2 v = __floats2half2_rn(x, y);
        return *reinterpret_cast<uint32_t*>(&v);
    }
};

// Rows 0..ROWS-1 of a tile from global memory: row r is token tok(r) (-1: missing, zeros).
// Thread x loads 16-byte chunk x % (D/8) of rows x / (D/8) + i * kThreads / (D/8).
template <typename T, int D, int ROWS, typename Layout, typename TokenOf>
__device__ __forceinline__ void load_tile(T* tile, const T* base, int64_t stride, TokenOf tok) {
    constexpr int kChunks = D / 8;
    static_assert((ROWS * kChunks) % kThreads == 0, "tile not a whole number of chunks per thread");
#pragma unroll
    for (int i = 0; i < ROWS * kChunks / kThreads; ++i) {
        const int c = threadIdx.x + i * kThreads;
        const int r = c / kChunks, ch = c % kChunks;
        const int t = tok(r);
        cp_async16(Layout::template chunk<T, D, ROWS>(tile, r, ch), base + (t < 0 ? 0 : int64_t(t) * stride) + ch * 8,
                   t >= 0);
    }
}

// The same assignment of rows to threads, with this thread's rows' tokens given (RowTokens): the
// N * kThreads / (D/8) rows of a tile
template <typename T, int D, typename Layout, int N>
__device__ __forceinline__ void load_rows(T* tile, const T* base, int64_t stride, const int (&tok)[N]) {
    constexpr int kChunks = D / 8, kRowsLoaded = N * kThreads / kChunks;
    const int ch = threadIdx.x % kChunks;
#pragma unroll
    for (int i = 0; i < N; ++i) {
        const int r = threadIdx.x / kChunks + i * (kThreads / kChunks);
        cp_async16(Layout::template chunk<T, D, kRowsLoaded>(tile, r, ch),
                   base + (tok[i] < 0 ? 0 : int64_t(tok[i]) * stride) + ch * 8, tok[i] >= 0);
    }
}

// One float per row (LSE, delta) of a block, zeros where missing: thread x loads row x.
__device__ __forceinline__ void load_float(float* dst, const float* base, int tok) {
    cp_async4(dst + threadIdx.x, base + (tok < 0 ? 0 : tok), tok >= 0);
}

__device__ __forceinline__ float row_max4(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float row_sum4(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// The pipelined walk of a tile (the same in every kernel): block it+1 streams into the other
// stage while body(stage, masked, bits) computes block it. The body runs in every warp (a warpgroup
// MMA needs all four); `bits` are the thread's visibility bits of the block, meaningful where
// `masked`, and cleared in a warp whose rows see nothing of it. Loads issued before the call (the
// tile's own rows) complete with the first block's; the landed copies are fenced for wgmma's reads
// (the async proxy).
template <int BLOCK_N, typename Load, typename Body>
__device__ __forceinline__ void walk(const Tile& tile, int warp, Load load_block, Body body) {
    Block cur = tile.first_block();
    if (tile.n_blocks > 0) load_block(cur, 0);
    cp_async_commit();
    uint32_t bits = 0;
    int bits_slice = -1;
    for (int it = 0; it < tile.n_blocks; ++it) {
        const int stage = it & 1;
        const Block nxt = tile.next(cur);
        if (it + 1 < tile.n_blocks) load_block(nxt, stage ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();
        const bool masked = tile.masked<BLOCK_N>(cur);
        if (masked && cur.s != bits_slice) {
            bits = tile.mask_bits<BLOCK_N>(cur, threadIdx.x & 31);
            bits_slice = cur.s;
        }
        body(stage, masked, tile.warp_sees(cur, warp) ? bits : 0u);
        __syncthreads();  // the stage is refilled two blocks on
        cur = nxt;
    }
    cp_async_wait<0>();
}

struct Program {
    int64_t b;
    int j, head;
    bool window, valid;
    __device__ Program(const Layer& L) {
        b = blockIdx.y / L.n_local;
        j = blockIdx.y % L.n_local;
        head = L.heads[j];
        window = j < L.n_window;
        valid = head >= 0 && head < L.n_heads;  // a bad table entry: skip, never index with it
    }
};

template <typename T>
__device__ __forceinline__ const T* head_base(const View& v, const Program& pr) {
    return static_cast<const T*>(v.ptr) + pr.b * v.sb + int64_t(pr.head) * v.sh;
}

template <typename T>
__device__ __forceinline__ T* head_base_mut(const View& v, const Program& pr) {
    return const_cast<T*>(head_base<T>(v, pr));
}

// the backward's delta[b, j, n] = sum_d dO[b, n, head_j, d] * O[b, n, head_j, d]: one warp per row
template <typename T, int D>
__global__ void __launch_bounds__(256) delta_kernel(const BackwardParams p) {
    const Layer& L = p.layer;
    const Program pr(L);
    const int N = L.T * L.H * L.W;
    const int n = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (n >= N || !pr.valid) return;
    const T* o = head_base<T>(p.out, pr) + int64_t(n) * p.out.sn;
    const T* g = head_base<T>(p.dout, pr) + int64_t(n) * p.dout.sn;
    float sum = 0.f;
#pragma unroll
    for (int d = lane * 2; d < D; d += 64) {
        float2 a, b;
        if constexpr (std::is_same_v<T, __nv_bfloat16>) {
            a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(o + d));
            b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(g + d));
        } else {
            a = __half22float2(*reinterpret_cast<const __half2*>(o + d));
            b = __half22float2(*reinterpret_cast<const __half2*>(g + d));
        }
        sum += a.x * b.x + a.y * b.y;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) p.delta[(pr.b * L.n_local + pr.j) * int64_t(N) + n] = sum;
}

}  // namespace detail
}  // namespace oasis_local
