// The backward of the local heads with Hopper's warpgroup MMA (wgmma.cuh), bf16 and fp16, sm_90a.
//
// The forward's programs, walks and masks (forward_wgmma.cuh, geometry.cuh): a program is 64 rows,
// one warpgroup, walking its blocks of 64 positions with two cp.async stages. Two kernels, no
// atomics, so the gradients are deterministic (delta = rowsum(dO * O) comes first, kernels.cuh):
//   dQ of a query tile, walking the keys it sees:
//     S = Q K^T and dP = dO V^T (both operands in shared memory, one commit group),
//     dS = P * (dP - delta) in registers (P from the forward's LSE), dQ += dS K (K N-major).
//   dK and dV of a key tile, walking the queries that see it (visibility is symmetric, so this is
//   the same walk and the same bits, with keys as the rows):
//     S^T = K Q^T and dP^T = V dO^T (one group), P^T from the queries' LSE, dS^T = P^T * (dP^T - delta),
//     then dV += P^T dO and dK += dS^T Q (dO and Q N-major) in one group.
// Every product is m64n64k16 with the fp32 accumulator in registers that the elementwise steps read in
// place; the A fragments of P^T and dS^T come from that layout as the forward's P does.
//
// The cost, as in the forward: a warpgroup instruction computes all 64 rows, so a window block's rows
// whose frame is more than rt from the block's are computed and masked (the mma.sync kernels these
// replace skipped them per warp).
//
// Shared memory (D = 128, bf16): dQ 96 KB (Q, dO, two stages of K and V), dK/dV 97 KB (K, V, two
// stages of Q and dO, and of the queries' LSE and delta), each + 1 KB to align the tiles: two programs
// per SM, as the forward.
#pragma once

#include "forward_wgmma.cuh"
#include "kernels.cuh"

namespace oasis_local {
namespace detail {

// s1 = A1 B1^T and s2 = A2 B2^T (64 x 64 each, the head dim as K), one commit group
template <typename T, int D>
__device__ __forceinline__ void wg_scores_pair(float (&s1)[32], const T* a1, const T* b1, float (&s2)[32], const T* a2,
                                               const T* b2) {
    wgmma::fence_operands(s1);
    wgmma::fence_operands(s2);
    wgmma::fence();
    issue_scores<T, D>(s1, a1, b1);
    issue_scores<T, D>(s2, a2, b2);
    wgmma::commit();
    wgmma::wait<0>();
    wgmma::fence_operands(s1);
    wgmma::fence_operands(s2);
}

// o1 += P1 B1 and o2 += P2 B2 (P: 64 x 64 fp32 in the accumulator layout, B: 64 rows x D N-major), one
// commit group
template <typename T, int D>
__device__ __forceinline__ void wg_accumulate_pair(float (&o1)[D / 64][32], const float (&p1)[32], const T* b1,
                                                   float (&o2)[D / 64][32], const float (&p2)[32], const T* b2) {
    uint32_t a1[4][4], a2[4][4];
    pack_a<T>(a1, p1);
    pack_a<T>(a2, p2);
    fence_accumulator<D>(o1);
    fence_accumulator<D>(o2);
    wgmma::fence();
    issue_accumulate<T, D>(o1, a1, b1);
    issue_accumulate<T, D>(o2, a2, b2);
    wgmma::commit();
    wgmma::wait<0>();
    fence_accumulator<D>(o1);
    fence_accumulator<D>(o2);
}

template <int D>
__device__ __forceinline__ void zero(float (&acc)[D / 64][32]) {
#pragma unroll
    for (int dp = 0; dp < D / 64; ++dp)
#pragma unroll
        for (int e = 0; e < 32; ++e) acc[dp][e] = 0.f;
}

// dQ of a query tile
template <typename T, int D, int BLOCK_N>
__global__ void __launch_bounds__(kThreads) dq_wgmma_kernel(const BackwardParams p, int bh, int bw) {
    static_assert(BLOCK_N == 64 && kThreads == 128 && kRows == 64, "one warpgroup, m64n64 score tiles");
    static_assert(D % 64 == 0, "dQ is D / 64 accumulators of 64 columns");
    extern __shared__ __align__(128) unsigned char smem_wg[];
    T* s_q = aligned_tiles<T>(smem_wg);
    T* s_do = s_q + kRows * D;
    T* s_k = s_do + kRows * D;        // two stages
    T* s_v = s_k + 2 * BLOCK_N * D;   // two stages

    const Layer& L = p.layer;
    const Program pr(L);
    Tile tile;
    if (!pr.valid || !tile.init<BLOCK_N>(blockIdx.x, pr.window, L, bh, bw)) return;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int N = L.T * L.H * L.W;

    auto row_tok = [&](int r) { return tile.row_token(r); };
    load_tile<T, D, kRows, WgmmaTile>(s_q, head_base<T>(p.q, pr), p.q.sn, row_tok);
    load_tile<T, D, kRows, WgmmaTile>(s_do, head_base<T>(p.dout, pr), p.dout.sn, row_tok);
    const T* k = head_base<T>(p.k, pr);
    const T* v = head_base<T>(p.v, pr);
    TileRows<D, BLOCK_N> rows(threadIdx.x / (D / 8));
    auto load_block = [&](Block b, int stage) {
        int tok[TileRows<D, BLOCK_N>::kRowsPerThread];
        rows.at(tile, b, tok);
        load_rows<T, D, WgmmaTile>(s_k + stage * BLOCK_N * D, k, p.k.sn, tok);
        load_rows<T, D, WgmmaTile>(s_v + stage * BLOCK_N * D, v, p.v.sn, tok);
    };
    // this thread's rows lane / 4 and + 8 of its warp's 16: their LSE (base 2) and delta; rows outside
    // the grid are zeros (Q and dO too), so their dS is 0 * (0 - 0) and they are never stored
    const int r0 = warp * 16 + (lane >> 2);
    const int tok0 = tile.row_token(r0), tok1 = tile.row_token(r0 + 8);
    const float* lse = p.lse + pr.b * p.lse_sb + int64_t(pr.head) * p.lse_sh;
    const float* delta = p.delta + (pr.b * L.n_local + pr.j) * int64_t(N);
    const float lse0 = tok0 >= 0 ? lse[tok0] * kLog2e : 0.f, lse1 = tok1 >= 0 ? lse[tok1] * kLog2e : 0.f;
    const float dl0 = tok0 >= 0 ? delta[tok0] : 0.f, dl1 = tok1 >= 0 ? delta[tok1] : 0.f;
    const float c = p.scale * kLog2e;

    float dq[D / 64][32];
    zero<D>(dq);
    walk<BLOCK_N>(tile, warp, load_block, [&](int stage, bool masked, uint32_t visible) {
        const T* kb = s_k + stage * BLOCK_N * D;
        float s[32], dp[32];
        wg_scores_pair<T, D>(s, s_q, kb, dp, s_do, s_v + stage * BLOCK_N * D);
#pragma unroll
        for (int e = 0; e < 32; ++e) {
            const bool hi = e & 2;  // row + 8
            float pe = exp2_approx(s[e] * c - (hi ? lse1 : lse0));
            if (masked && !((visible >> e) & 1u)) pe = 0.f;
            s[e] = pe * (dp[e] - (hi ? dl1 : dl0));  // dS
        }
        wg_accumulate<T, D>(dq, s, kb);
    });
    store_accumulator<T, D>(head_base_mut<T>(p.dq, pr), p.dq.sn, tok0, tok1, dq, p.scale, p.scale);
}

// dK and dV of a key tile
template <typename T, int D, int BLOCK_N>
__global__ void __launch_bounds__(kThreads) dkdv_wgmma_kernel(const BackwardParams p, int bh, int bw) {
    static_assert(BLOCK_N == 64 && kThreads == 128 && kRows == 64, "one warpgroup, m64n64 score tiles");
    static_assert(D % 64 == 0, "dK and dV are D / 64 accumulators of 64 columns each");
    extern __shared__ __align__(128) unsigned char smem_wg[];
    T* s_k = aligned_tiles<T>(smem_wg);
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
    load_tile<T, D, kRows, WgmmaTile>(s_k, head_base<T>(p.k, pr), p.k.sn, row_tok);
    load_tile<T, D, kRows, WgmmaTile>(s_v, head_base<T>(p.v, pr), p.v.sn, row_tok);
    const T* q = head_base<T>(p.q, pr);
    const T* g = head_base<T>(p.dout, pr);
    const float* lse = p.lse + pr.b * p.lse_sb + int64_t(pr.head) * p.lse_sh;
    const float* delta = p.delta + (pr.b * L.n_local + pr.j) * int64_t(N);
    TileRows<D, BLOCK_N> rows(threadIdx.x / (D / 8));
    RowTokens<1, kThreads, BLOCK_N> row_of_float(threadIdx.x);  // LSE and delta: thread x loads row x
    auto load_block = [&](Block b, int stage) {
        int tok[TileRows<D, BLOCK_N>::kRowsPerThread];
        rows.at(tile, b, tok);
        load_rows<T, D, WgmmaTile>(s_q + stage * BLOCK_N * D, q, p.q.sn, tok);
        load_rows<T, D, WgmmaTile>(s_do + stage * BLOCK_N * D, g, p.dout.sn, tok);
        if (threadIdx.x < BLOCK_N) {
            int t[1];
            row_of_float.at(tile, b, t);
            load_float(s_lse + stage * BLOCK_N, lse, t[0]);
            load_float(s_delta + stage * BLOCK_N, delta, t[0]);
        }
    };
    const float c = p.scale * kLog2e;
    float dk[D / 64][32], dv[D / 64][32];
    zero<D>(dk);
    zero<D>(dv);
    walk<BLOCK_N>(tile, warp, load_block, [&](int stage, bool masked, uint32_t visible) {
        const T* qb = s_q + stage * BLOCK_N * D;
        const T* gb = s_do + stage * BLOCK_N * D;
        const float* lb = s_lse + stage * BLOCK_N;
        const float* db = s_delta + stage * BLOCK_N;
        float pt[32], dpt[32];  // P^T and dP^T: rows are the tile's keys, columns the block's queries
        wg_scores_pair<T, D>(pt, s_k, qb, dpt, s_v, gb);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
#pragma unroll
            for (int c2 = 0; c2 < 2; ++c2) {
                // column 8j + 2(lane % 4) + c2: accumulator elements 4j + c2 (row) and 4j + 2 + c2 (row + 8)
                const int col = 8 * j + 2 * (lane & 3) + c2;
                const float lse_col = lb[col] * kLog2e, dl_col = db[col];
#pragma unroll
                for (int hi = 0; hi < 2; ++hi) {
                    const int e = 4 * j + 2 * hi + c2;
                    float pe = exp2_approx(pt[e] * c - lse_col);
                    if (masked && !((visible >> e) & 1u)) pe = 0.f;
                    pt[e] = pe;
                    dpt[e] = pe * (dpt[e] - dl_col);  // dS^T
                }
            }
        }
        wg_accumulate_pair<T, D>(dv, pt, gb, dk, dpt, qb);
    });
    const int r0 = warp * 16 + (lane >> 2);
    const int tok0 = tile.row_token(r0), tok1 = tile.row_token(r0 + 8);
    store_accumulator<T, D>(head_base_mut<T>(p.dk, pr), p.dk.sn, tok0, tok1, dk, p.scale, p.scale);
    store_accumulator<T, D>(head_base_mut<T>(p.dv, pr), p.dv.sn, tok0, tok1, dv, 1.f, 1.f);
}

}  // namespace detail
}  // namespace oasis_local
