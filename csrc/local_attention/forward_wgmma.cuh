// The forward of the local heads with Hopper's warpgroup MMA (wgmma.cuh), bf16 and fp16, sm_90a.
//
// The same work split, walk and masks as the backward (backward_wgmma.cuh, kernels.cuh, geometry.cuh): a program is
// 64 query rows (window: 4 frames x bh x bw, one frame per warp; intra: 64 tokens of a frame) and
// walks its blocks of BLOCK_N = 64 keys. The four warps are one warpgroup, and each block's
// S = Q K^T (64 x 64, the head dim as K) and O += P V (64 x D, the block's keys as K) are wgmma
// instructions reading Q, K and V from shared memory (P from registers). This replaced a forward of
// 16 mma.sync per warp and block fed by ldmatrix (main at 426bad8), which Nsight Compute found
// latency-bound with ~14 instructions per MMA (docs/PERF.md entry 21e); here the instruction count
// per scored key is the softmax's, and no thread holds operand fragments.
//
// The cost: a warpgroup instruction computes all 64 rows, so a window block's rows whose frame is
// more than rt from the block's are computed and masked (384 scored keys per query at rt = 1, as the
// Triton kernel), where the mma.sync forward's warps skipped them (192).
//
// Shared memory: Q (64 x D) and two stages of K and V (64 x D each), every tile in the 128-byte
// swizzled panels wgmma reads (wgmma::swizzled: 64-element panels of `rows` rows, 16-byte chunk c of
// row r at c ^ (r & 7)); K and V as they lie, keys by head dim (K-major for S, N-major for O).
// Loads are cp.async (zero-filled where a row is missing), made visible to wgmma's async proxy by a
// proxy fence before the barrier that publishes them.
#pragma once

#include "kernels.cuh"
#include "../hopper/wgmma.cuh"

namespace oasis_local {
namespace detail {

// The wgmma tiles' layout for kernels.cuh's loads: 16-byte chunk `ch` (of D / 8) of row `row` of a tile
// of ROWS rows, in 64-element panels of 128-byte swizzled rows (wgmma::swizzled)
struct WgmmaTile {
    template <typename T, int D, int ROWS>
    __device__ __forceinline__ static T* chunk(T* tile, int row, int ch) {
        return tile + wgmma::swizzled(row, ch * 8, ROWS);
    }
};

// s (64 x 64, fp32) = A (64 x D) B^T (B: 64 rows x D), both K-major in shared memory: the MMAs
// only (no fence, commit or wait), so that several products can share one commit group
template <typename T, int D>
__device__ __forceinline__ void issue_scores(float (&s)[32], const T* a, const T* b) {
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks)
        wgmma::mma_ss<std::is_same_v<T, __half>>(s, wgmma::k_major(a, ks, kRows), wgmma::k_major(b, ks, 64), ks > 0);
}

// FlashAttention-3's intra-warpgroup overlap issues a block's products without waiting for them, so that the
// softmax of one block runs while the tensor cores work on another. Each *_group below is one commit group; the
// caller waits (wgmma::wait<N>) and then fences the registers the group wrote (fence_accumulator,
// wgmma::fence_operands) or read (fence_fragments: the A fragments of O += P V must not be reused before its
// group completes, so they stay live until that fence). wg_scores and wg_accumulate wait at once.

// s = Q K^T issued as one commit group (not waited for)
template <typename T, int D>
__device__ __forceinline__ void issue_scores_group(float (&s)[32], const T* q, const T* k) {
    wgmma::fence_operands(s);
    wgmma::fence();
    issue_scores<T, D>(s, q, k);
    wgmma::commit();
}

// S (64 x 64, fp32 accumulator) = Q (64 x D) K^T (K: 64 keys x D), both K-major in shared memory
template <typename T, int D>
__device__ __forceinline__ void wg_scores(float (&s)[32], const T* q, const T* k) {
    issue_scores_group<T, D>(s, q, k);
    wgmma::wait<0>();
    wgmma::fence_operands(s);
}

// P (64 x 64, fp32 in the accumulator layout) as the A fragments of its four 16-column k-steps: the
// accumulator layout of n-tiles 2kc and 2kc+1 is the A fragment of columns 16kc..16kc+15
template <typename T>
__device__ __forceinline__ void pack_a(uint32_t (&a)[4][4], const float (&p)[32]) {
#pragma unroll
    for (int kc = 0; kc < 4; ++kc) {
        a[kc][0] = Mma<T>::pack(p[8 * kc + 0], p[8 * kc + 1]);
        a[kc][1] = Mma<T>::pack(p[8 * kc + 2], p[8 * kc + 3]);
        a[kc][2] = Mma<T>::pack(p[8 * kc + 4], p[8 * kc + 5]);
        a[kc][3] = Mma<T>::pack(p[8 * kc + 6], p[8 * kc + 7]);
    }
}

// o (64 x D as D/64 accumulators of 64 x 64) += A (64 x 64, fragments) B (64 rows x D, N-major: the
// head dim is N): the MMAs only
template <typename T, int D>
__device__ __forceinline__ void issue_accumulate(float (&o)[D / 64][32], const uint32_t (&a)[4][4], const T* b) {
#pragma unroll
    for (int kc = 0; kc < 4; ++kc) {
#pragma unroll
        for (int dp = 0; dp < D / 64; ++dp)
            wgmma::mma_rs<std::is_same_v<T, __half>>(o[dp], a[kc], wgmma::n_major(b + dp * 64 * 64, kc, 64), true);
    }
}

template <int D>
__device__ __forceinline__ void fence_accumulator(float (&o)[D / 64][32]) {
#pragma unroll
    for (int dp = 0; dp < D / 64; ++dp) wgmma::fence_operands(o[dp]);
}

// o += P V, P given as A fragments (pack_a), issued as one commit group (not waited for)
template <typename T, int D>
__device__ __forceinline__ void issue_accumulate_group(float (&o)[D / 64][32], const uint32_t (&a)[4][4], const T* v) {
    fence_accumulator<D>(o);
    wgmma::fence();
    issue_accumulate<T, D>(o, a, v);
    wgmma::commit();
}

// O (64 x D as D/64 accumulators of 64 x 64) += P (64 x 64 keys, fp32 in the accumulator layout)
// V (64 keys x D, N-major: the head dim is N)
template <typename T, int D>
__device__ __forceinline__ void wg_accumulate(float (&o)[D / 64][32], const float (&p)[32], const T* v) {
    uint32_t a[4][4];
    pack_a<T>(a, p);
    issue_accumulate_group<T, D>(o, a, v);
    wgmma::wait<0>();
    fence_accumulator<D>(o);
}

// keeps the A fragments alive (and unmoved) up to here: after the wait for the group that reads them
__device__ __forceinline__ void fence_fragments(uint32_t (&a)[4][4]) {
#pragma unroll
    for (int kc = 0; kc < 4; ++kc)
#pragma unroll
        for (int i = 0; i < 4; ++i) asm volatile("" : "+r"(a[kc][i])::"memory");
}

// rows tok0 / tok1 (-1: not stored) of a [.., D] tensor: the accumulator's rows lane / 4 and + 8 of the
// warp's 16, times scale0 / scale1
template <typename T, int D>
__device__ __forceinline__ void store_accumulator(T* base, int64_t stride, int tok0, int tok1,
                                                  const float (&acc)[D / 64][32], float scale0, float scale1) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int dp = 0; dp < D / 64; ++dp)
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int col = dp * 64 + 8 * j + 2 * (lane & 3);
            if (tok0 >= 0)
                *reinterpret_cast<uint32_t*>(base + int64_t(tok0) * stride + col) =
                    Mma<T>::pack(acc[dp][4 * j] * scale0, acc[dp][4 * j + 1] * scale0);
            if (tok1 >= 0)
                *reinterpret_cast<uint32_t*>(base + int64_t(tok1) * stride + col) =
                    Mma<T>::pack(acc[dp][4 * j + 2] * scale1, acc[dp][4 * j + 3] * scale1);
        }
}

// wgmma's 128-byte swizzle wants 1024-byte aligned tiles: the first such address of the dynamic shared
// memory (the launchers add 1024 bytes for this)
template <typename T>
__device__ __forceinline__ T* aligned_tiles(unsigned char* smem) {
    return reinterpret_cast<T*>(smem + ((1024 - (wgmma::smem_address(smem) & 1023)) & 1023));
}

// The online softmax of one 64-key block for a warpgroup (every wgmma forward's: this file's and forward_tma.cuh's):
// scores of Q (64 x D) against the K stage, `visible` the thread's bits (bit 4 j + e: accumulator element),
// all visible where `all`; the V stage accumulated into o.
template <typename T, int D>
struct WgSoftmax {
    float m0 = kNegInf, m1 = kNegInf, l0 = 0.f, l1 = 0.f;
    float o[D / 64][32];

    __device__ WgSoftmax() {
#pragma unroll
        for (int dp = 0; dp < D / 64; ++dp)
#pragma unroll
            for (int e = 0; e < 32; ++e) o[dp][e] = 0.f;
    }

    template <typename WaitV>
    __device__ __forceinline__ void block(const T* q, const T* k, const T* v, float c, bool all, uint32_t visible,
                                          WaitV wait_v) {
        float sc[32];
        wg_scores<T, D>(sc, q, k);
        float a0, a1;
        if (probs(sc, c, all, visible, a0, a1)) rescale(a0, a1);
        wait_v();
        wg_accumulate<T, D>(o, sc, v);
    }

    // One block's scores `sc` (this warpgroup's accumulator of S = Q K^T) made its probabilities in place, the
    // running max and sums updated: `visible` the thread's bits (bit 4 j + e: accumulator element), all visible
    // where `all`. True where a row's max moved in the warp: then o must be scaled by (a0, a1) (rescale) before
    // this block's P V is added to it. Touches no accumulator register, so it may run while a P V is in flight.
    __device__ __forceinline__ bool probs(float (&sc)[32], float c, bool all, uint32_t visible, float& a0, float& a1) {
        if (all) {
#pragma unroll
            for (int e = 0; e < 32; ++e) sc[e] *= c;
        } else {
#pragma unroll
            for (int e = 0; e < 32; ++e) sc[e] = (visible >> e) & 1u ? sc[e] * c : kNegInf;
        }
        float mx0 = kNegInf, mx1 = kNegInf;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            mx0 = fmaxf(mx0, fmaxf(sc[4 * j], sc[4 * j + 1]));
            mx1 = fmaxf(mx1, fmaxf(sc[4 * j + 2], sc[4 * j + 3]));
        }
        mx0 = row_max4(mx0);
        mx1 = row_max4(mx1);
        const bool up0 = mx0 > m0 + kRescaleSlack, up1 = mx1 > m1 + kRescaleSlack;
        const bool moved = __any_sync(0xffffffffu, up0 || up1);
        a0 = 1.f;
        a1 = 1.f;
        if (moved) {
            a0 = up0 ? exp2_approx(m0 - mx0) : 1.f;
            a1 = up1 ? exp2_approx(m1 - mx1) : 1.f;
            if (up0) { m0 = mx0; l0 *= a0; }
            if (up1) { m1 = mx1; l1 *= a1; }
        }
        const float z0 = m0 == kNegInf ? 0.f : m0, z1 = m1 == kNegInf ? 0.f : m1;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            sc[4 * j] = exp2_approx(sc[4 * j] - z0); sc[4 * j + 1] = exp2_approx(sc[4 * j + 1] - z0);
            sc[4 * j + 2] = exp2_approx(sc[4 * j + 2] - z1); sc[4 * j + 3] = exp2_approx(sc[4 * j + 3] - z1);
            l0 += sc[4 * j] + sc[4 * j + 1];
            l1 += sc[4 * j + 2] + sc[4 * j + 3];
        }
        return moved;
    }

    // o's rows scaled by a0 (the thread's first row) and a1 (its second): the running max moved
    __device__ __forceinline__ void rescale(float a0, float a1) {
#pragma unroll
        for (int dp = 0; dp < D / 64; ++dp)
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                o[dp][4 * j] *= a0; o[dp][4 * j + 1] *= a0;
                o[dp][4 * j + 2] *= a1; o[dp][4 * j + 3] *= a1;
            }
    }

    // rows tok0 / tok1 (-1: not stored) of out and lse: the warp's rows lane / 4 and + 8
    __device__ __forceinline__ void store(const ForwardParams& p, const Program& pr, int tok0, int tok1) {
        const int lane = threadIdx.x & 31;
        l0 = row_sum4(l0);
        l1 = row_sum4(l1);
        const float ls0 = l0 > 0.f ? l0 : 1.f, ls1 = l1 > 0.f ? l1 : 1.f;
        store_accumulator<T, D>(head_base_mut<T>(p.out, pr), p.out.sn, tok0, tok1, o, 1.f / ls0, 1.f / ls1);
        if ((lane & 3) == 0) {
            float* lse = p.lse + pr.b * p.lse_sb + int64_t(pr.head) * p.lse_sh;
            if (tok0 >= 0) lse[tok0] = (m0 + log2f(ls0)) * kLn2;
            if (tok1 >= 0) lse[tok1] = (m1 + log2f(ls1)) * kLn2;
        }
    }
};

template <typename T, int D, int BLOCK_N>
__global__ void __launch_bounds__(kThreads) forward_wgmma_kernel(const ForwardParams p, int bh, int bw) {
    static_assert(BLOCK_N == 64, "one m64n64 score tile per block");
    static_assert(kThreads == 128 && kRows == 64, "the block is one warpgroup of 64 rows");
    static_assert(D % 64 == 0, "O is D / 64 accumulators of 64 columns");
    extern __shared__ __align__(128) unsigned char smem_wg[];
    T* s_q = aligned_tiles<T>(smem_wg);
    T* s_k = s_q + kRows * D;         // two stages
    T* s_v = s_k + 2 * BLOCK_N * D;   // two stages

    const Layer& L = p.layer;
    const Program pr(L);
    Tile tile;
    if (!pr.valid || !tile.init<BLOCK_N>(blockIdx.x, pr.window, L, bh, bw)) return;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

    const T* q = head_base<T>(p.q, pr);
    const T* k = head_base<T>(p.k, pr);
    const T* v = head_base<T>(p.v, pr);
    load_tile<T, D, kRows, WgmmaTile>(s_q, q, p.q.sn, [&](int r) { return tile.row_token(r); });
    TileRows<D, BLOCK_N> rows(threadIdx.x / (D / 8));
    auto load_block = [&](Block b, int stage) {
        int tok[TileRows<D, BLOCK_N>::kRowsPerThread];
        rows.at(tile, b, tok);
        static_assert(TileRows<D, BLOCK_N>::kRowsPerThread * kThreads == BLOCK_N * (D / 8), "the block's rows");
        load_rows<T, D, WgmmaTile>(s_k + stage * BLOCK_N * D, k, p.k.sn, tok);
        load_rows<T, D, WgmmaTile>(s_v + stage * BLOCK_N * D, v, p.v.sn, tok);
    };

    const float c = p.scale * kLog2e;
    WgSoftmax<T, D> sm;
    walk<BLOCK_N>(tile, warp, load_block, [&](int stage, bool masked, uint32_t visible) {
        sm.block(s_q, s_k + stage * BLOCK_N * D, s_v + stage * BLOCK_N * D, c, !masked, visible, [] {});
    });
    const int r0 = warp * 16 + (lane >> 2);
    sm.store(p, pr, tile.row_token(r0), tile.row_token(r0 + 8));
}

}  // namespace detail
}  // namespace oasis_local
