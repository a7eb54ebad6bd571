// Kernels for the local heads' backward: dQ, dK/dV and delta = rowsum(dO * O) (the forward, on
// warpgroup MMA, is forward_wgmma.cuh; it shares this file's walk, loads and softmax constants).
//
// Work split (geometry.cuh; the same as the Triton kernels', oasis_kernels/kernels/tile_geometry.py):
// grid.y runs over (batch, local head), grid.x over the head's primary tiles of 64 rows, four
// warps of 16 rows each. Window tiles are 4 frames x bh x bw tokens, one frame per warp, their
// halo walked one frame per block in slices; a warp whose frame is more than rt frames from a
// block's skips that block's math, so each warp scores 2rt+1 halo frames, not all 4+2rt. Intra
// tiles are 64 tokens of a frame, walking the frame. Each thread keeps its visibility bits per
// slice (one 32-bit mask) and its load rows' offsets per slice; the walk itself divides by nothing.
// Rows, columns and their tokens: rows of a tile that fall outside the grid and positions of a
// halo outside the grid are loaded as zeros (cp.async zero-fill) and masked, never stored.
//
// Matrix products: mma.sync m16n8k16 (bf16/fp16 in, fp32 accumulate) with operands from
// shared memory by ldmatrix; rows of shared memory are swizzled in 16-byte chunks (chunk c of
// row r sits at c ^ (r & 7)) so ldmatrix's eight rows hit eight different bank groups. Loads
// are cp.async, two stages: the next block streams in while the current one is computed.
// The backward is deterministic: dQ and dK/dV are separate kernels, no atomics.
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

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

template <typename T>
struct Mma;

template <>
struct Mma<__nv_bfloat16> {
    // c += a @ b, a 16x16 (row), b 16x8 (col), c 16x8 fp32
    static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ uint32_t pack(float x, float y) {
        __nv_bfloat162 v = __floats2bfloat162_rn(x, y);  // x in the low half
        return *reinterpret_cast<uint32_t*>(&v);
    }
};

template <>
struct Mma<__half> {
    static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ uint32_t pack(float x, float y) {
        __half2 v = __floats2half2_rn(x, y);
        return *reinterpret_cast<uint32_t*>(&v);
    }
};

// ---------------------------------------------------------------------------------------
// shared-memory tiles: rows of D elements, 16-byte chunks swizzled by the row
// ---------------------------------------------------------------------------------------

template <typename T, int D>
__device__ __forceinline__ T* chunk_at(T* tile, int row, int chunk) {
    return tile + row * D + ((chunk ^ (row & 7)) << 3);
}

// Where a tile's 16-byte chunk lies: the row-major swizzled tiles of ldmatrix (chunk_at); the forward's
// wgmma tiles are laid out otherwise (forward_wgmma.cuh) and pass their own layout to the loads below.
struct RowMajorTile {
    template <typename T, int D, int ROWS>
    __device__ __forceinline__ static T* chunk(T* tile, int row, int ch) { return chunk_at<T, D>(tile, row, ch); }
};

// Rows 0..ROWS-1 of a tile from global memory: row r is token tok(r) (-1: missing, zeros).
// Thread x loads 16-byte chunk x % (D/8) of rows x / (D/8) + i * kThreads / (D/8).
template <typename T, int D, int ROWS, typename Layout = RowMajorTile, typename TokenOf>
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
template <typename T, int D, typename Layout = RowMajorTile, int N>
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

// A operand (16 rows x 16 of the head dim, chunk pair kk) of rows row0.. of a tile
template <typename T, int D>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int row0, int kk) {
    const int lane = threadIdx.x & 31;
    ldmatrix_x4(a, chunk_at<T, D>(const_cast<T*>(tile), row0 + (lane & 15), kk * 2 + (lane >> 4)));
}

// B operands of two n-tiles (rows n0..n0+15 of a tile are the n index, the head dim the k
// index): b[0], b[1] for rows n0..n0+7, b[2], b[3] for n0+8..n0+15
template <typename T, int D>
__device__ __forceinline__ void load_b(uint32_t (&b)[4], const T* tile, int n0, int kk) {
    const int lane = threadIdx.x & 31;
    ldmatrix_x4(b, chunk_at<T, D>(const_cast<T*>(tile), n0 + ((lane >> 4) << 3) + (lane & 7), kk * 2 + ((lane >> 3) & 1)));
}

// B operands of two n-tiles where the tile's rows are the k index (16 rows from k0) and the
// head dim the n index (columns d0..d0+15): b[0], b[1] for d0..d0+7, b[2], b[3] for d0+8..
template <typename T, int D>
__device__ __forceinline__ void load_b_trans(uint32_t (&b)[4], const T* tile, int k0, int d0) {
    const int lane = threadIdx.x & 31;
    ldmatrix_x4_trans(b, chunk_at<T, D>(const_cast<T*>(tile), k0 + (((lane >> 3) & 1) << 3) + (lane & 7),
                                        (d0 >> 3) + (lane >> 4)));
}

// s[n] (16 x 8 each, NT of them) = rows row0.. of A times rows of B (both with the head dim as k)
template <typename T, int D, int NT>
__device__ __forceinline__ void scores(float (&s)[NT][4], const T* a_tile, int row0, const T* b_tile) {
#pragma unroll
    for (int n = 0; n < NT; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a[4];
        load_a<T, D>(a, a_tile, row0, kk);
#pragma unroll
        for (int n = 0; n < NT; n += 2) {
            uint32_t b[4];
            load_b<T, D>(b, b_tile, n * 8, kk);
            Mma<T>::run(s[n], a, b[0], b[1]);
            Mma<T>::run(s[n + 1], a, b[2], b[3]);
        }
    }
}

// acc (16 x D) += p (16 x 8*NT, fp32 in the accumulator layout) @ rows 0..8*NT-1 of tile
template <typename T, int D, int NT>
__device__ __forceinline__ void accumulate(float (&acc)[D / 8][4], const float (&p)[NT][4], const T* tile) {
#pragma unroll
    for (int kc = 0; kc < NT / 2; ++kc) {
        // the accumulator layout of two n-tiles is the A layout of one 16-wide k chunk
        const uint32_t a[4] = {Mma<T>::pack(p[2 * kc][0], p[2 * kc][1]), Mma<T>::pack(p[2 * kc][2], p[2 * kc][3]),
                               Mma<T>::pack(p[2 * kc + 1][0], p[2 * kc + 1][1]),
                               Mma<T>::pack(p[2 * kc + 1][2], p[2 * kc + 1][3])};
#pragma unroll
        for (int dn = 0; dn < D / 8; dn += 2) {
            uint32_t b[4];
            load_b_trans<T, D>(b, tile, kc * 16, dn * 8);
            Mma<T>::run(acc[dn], a, b[0], b[1]);
            Mma<T>::run(acc[dn + 1], a, b[2], b[3]);
        }
    }
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
// stage while body(stage, masked, bits) computes block it, called only in the warps whose rows
// see something of it (warp-uniform, so the body may use warp collectives). `bits` are the
// thread's visibility bits of the block, meaningful where `masked`. Loads issued before the call
// (the tile's own rows) complete with the first block's. WARPGROUP (the wgmma forward): the body
// runs in every warp, a warpgroup MMA needing all four, with the bits of a warp whose rows see
// nothing of the block cleared; and the landed copies are fenced for wgmma's reads (the async proxy).
template <int BLOCK_N, bool WARPGROUP = false, typename Load, typename Body>
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
        if constexpr (WARPGROUP) asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();
        const bool masked = tile.masked<BLOCK_N>(cur);
        if (masked && cur.s != bits_slice) {
            bits = tile.mask_bits<BLOCK_N>(cur, threadIdx.x & 31);
            bits_slice = cur.s;
        }
        if constexpr (WARPGROUP)
            body(stage, masked, tile.warp_sees(cur, warp) ? bits : 0u);
        else if (tile.warp_sees(cur, warp))
            body(stage, masked, bits);
        __syncthreads();  // the stage is refilled two blocks on
        cur = nxt;
    }
    cp_async_wait<0>();
}

// store a 16 x D fp32 block (accumulator layout) times `scale` into rows of a [.., D] tensor
template <typename T, int D>
__device__ __forceinline__ void store_rows(T* base, int64_t stride, int tok0, int tok1, const float (&acc)[D / 8][4],
                                           float scale0, float scale1) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
        const int col = dn * 8 + 2 * (lane & 3);
        if (tok0 >= 0)
            *reinterpret_cast<uint32_t*>(base + int64_t(tok0) * stride + col) =
                Mma<T>::pack(acc[dn][0] * scale0, acc[dn][1] * scale0);
        if (tok1 >= 0)
            *reinterpret_cast<uint32_t*>(base + int64_t(tok1) * stride + col) =
                Mma<T>::pack(acc[dn][2] * scale1, acc[dn][3] * scale1);
    }
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

// ---------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------

// delta[b, j, n] = sum_d dO[b, n, head_j, d] * O[b, n, head_j, d]: one warp per row
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

// dQ of a query tile: walks the keys as the forward does
template <typename T, int D, int BLOCK_N>
__global__ void __launch_bounds__(kThreads) dq_kernel(const BackwardParams p, int bh, int bw) {
    constexpr int NT = BLOCK_N / 8;
    extern __shared__ __align__(128) unsigned char smem[];
    T* s_q = reinterpret_cast<T*>(smem);
    T* s_do = s_q + kRows * D;
    T* s_k = s_do + kRows * D;         // two stages
    T* s_v = s_k + 2 * BLOCK_N * D;    // two stages

    const Layer& L = p.layer;
    const Program pr(L);
    Tile tile;
    if (!pr.valid || !tile.init<BLOCK_N>(blockIdx.x, pr.window, L, bh, bw)) return;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int N = L.T * L.H * L.W;

    auto row_tok = [&](int r) { return tile.row_token(r); };
    load_tile<T, D, kRows>(s_q, head_base<T>(p.q, pr), p.q.sn, row_tok);
    load_tile<T, D, kRows>(s_do, head_base<T>(p.dout, pr), p.dout.sn, row_tok);
    const T* k = head_base<T>(p.k, pr);
    const T* v = head_base<T>(p.v, pr);
    TileRows<D, BLOCK_N> rows(threadIdx.x / (D / 8));
    auto load_block = [&](Block b, int stage) {
        int tok[TileRows<D, BLOCK_N>::kRowsPerThread];
        rows.at(tile, b, tok);
        load_rows<T, D>(s_k + stage * BLOCK_N * D, k, p.k.sn, tok);
        load_rows<T, D>(s_v + stage * BLOCK_N * D, v, p.v.sn, tok);
    };
    const int r0 = warp * 16 + (lane >> 2);
    const int tok0 = tile.row_token(r0), tok1 = tile.row_token(r0 + 8);
    const float* lse = p.lse + pr.b * p.lse_sb + int64_t(pr.head) * p.lse_sh;
    const float* delta = p.delta + (pr.b * L.n_local + pr.j) * int64_t(N);
    const float lse0 = tok0 >= 0 ? lse[tok0] * kLog2e : 0.f, lse1 = tok1 >= 0 ? lse[tok1] * kLog2e : 0.f;
    const float dl0 = tok0 >= 0 ? delta[tok0] : 0.f, dl1 = tok1 >= 0 ? delta[tok1] : 0.f;
    const float c = p.scale * kLog2e;

    float dq[D / 8][4];
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) dq[dn][0] = dq[dn][1] = dq[dn][2] = dq[dn][3] = 0.f;

    walk<BLOCK_N>(tile, warp, load_block, [&](int stage, bool masked, uint32_t bits) {
        const T* kb = s_k + stage * BLOCK_N * D;
        const T* vb = s_v + stage * BLOCK_N * D;
        float s[NT][4], dp[NT][4];
        scores<T, D, NT>(s, s_q, warp * 16, kb);
        scores<T, D, NT>(dp, s_do, warp * 16, vb);
#pragma unroll
        for (int n = 0; n < NT; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float pe = exp2_approx(s[n][e] * c - (e < 2 ? lse0 : lse1));
                if (masked && !((bits >> (4 * n + e)) & 1u)) pe = 0.f;
                s[n][e] = pe * (dp[n][e] - (e < 2 ? dl0 : dl1));  // dS
            }
        }
        accumulate<T, D, NT>(dq, s, kb);
    });
    store_rows<T, D>(head_base_mut<T>(p.dq, pr), p.dq.sn, tok0, tok1, dq, p.scale, p.scale);
}

// dK and dV of a key tile: walks the queries that see it (its halo, visibility is symmetric)
template <typename T, int D, int BLOCK_N>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(const BackwardParams p, int bh, int bw) {
    constexpr int NT = BLOCK_N / 8;
    extern __shared__ __align__(128) unsigned char smem[];
    T* s_k = reinterpret_cast<T*>(smem);
    T* s_v = s_k + kRows * D;
    T* s_q = s_v + kRows * D;           // two stages
    T* s_do = s_q + 2 * BLOCK_N * D;    // two stages
    float* s_lse = reinterpret_cast<float*>(s_do + 2 * BLOCK_N * D);  // two stages
    float* s_delta = s_lse + 2 * BLOCK_N;                               // two stages

    const Layer& L = p.layer;
    const Program pr(L);
    Tile tile;
    if (!pr.valid || !tile.init<BLOCK_N>(blockIdx.x, pr.window, L, bh, bw)) return;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int N = L.T * L.H * L.W;

    auto row_tok = [&](int r) { return tile.row_token(r); };
    load_tile<T, D, kRows>(s_k, head_base<T>(p.k, pr), p.k.sn, row_tok);
    load_tile<T, D, kRows>(s_v, head_base<T>(p.v, pr), p.v.sn, row_tok);
    const T* q = head_base<T>(p.q, pr);
    const T* g = head_base<T>(p.dout, pr);
    const float* lse = p.lse + pr.b * p.lse_sb + int64_t(pr.head) * p.lse_sh;
    const float* delta = p.delta + (pr.b * L.n_local + pr.j) * int64_t(N);
    TileRows<D, BLOCK_N> rows(threadIdx.x / (D / 8));
    RowTokens<1, kThreads, BLOCK_N> row_of_float(threadIdx.x);  // LSE and delta: thread x loads row x
    auto load_block = [&](Block b, int stage) {
        int tok[TileRows<D, BLOCK_N>::kRowsPerThread];
        rows.at(tile, b, tok);
        load_rows<T, D>(s_q + stage * BLOCK_N * D, q, p.q.sn, tok);
        load_rows<T, D>(s_do + stage * BLOCK_N * D, g, p.dout.sn, tok);
        if (threadIdx.x < BLOCK_N) {
            int t[1];
            row_of_float.at(tile, b, t);
            load_float(s_lse + stage * BLOCK_N, lse, t[0]);
            load_float(s_delta + stage * BLOCK_N, delta, t[0]);
        }
    };
    const float c = p.scale * kLog2e;
    float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
        dk[dn][0] = dk[dn][1] = dk[dn][2] = dk[dn][3] = 0.f;
        dv[dn][0] = dv[dn][1] = dv[dn][2] = dv[dn][3] = 0.f;
    }

    walk<BLOCK_N>(tile, warp, load_block, [&](int stage, bool masked, uint32_t bits) {
        const T* qb = s_q + stage * BLOCK_N * D;
        const T* gb = s_do + stage * BLOCK_N * D;
        const float* lb = s_lse + stage * BLOCK_N;
        const float* db = s_delta + stage * BLOCK_N;
        float pt[NT][4];  // P^T: rows are this warp's keys, columns the block's queries
        scores<T, D, NT>(pt, s_k, warp * 16, qb);
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            const int col = 8 * n + 2 * (lane & 3);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float pe = exp2_approx(pt[n][e] * c - lb[col + (e & 1)] * kLog2e);
                if (masked && !((bits >> (4 * n + e)) & 1u)) pe = 0.f;
                pt[n][e] = pe;
            }
        }
        accumulate<T, D, NT>(dv, pt, gb);
        float dpt[NT][4];
        scores<T, D, NT>(dpt, s_v, warp * 16, gb);
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            const int col = 8 * n + 2 * (lane & 3);
#pragma unroll
            for (int e = 0; e < 4; ++e) dpt[n][e] = pt[n][e] * (dpt[n][e] - db[col + (e & 1)]);  // dS^T
        }
        accumulate<T, D, NT>(dk, dpt, qb);
    });
    const int r0 = warp * 16 + (lane >> 2);
    const int tok0 = tile.row_token(r0), tok1 = tile.row_token(r0 + 8);
    store_rows<T, D>(head_base_mut<T>(p.dk, pr), p.dk.sn, tok0, tok1, dk, p.scale, p.scale);
    store_rows<T, D>(head_base_mut<T>(p.dv, pr), p.dv.sn, tok0, tok1, dv, 1.f, 1.f);
}

}  // namespace detail
}  // namespace oasis_local
