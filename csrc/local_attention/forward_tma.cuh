// The forward of the intra-frame heads with TMA loads and warp specialisation, sm_90a (FlashAttention-3's
// layout, without its intra-warpgroup overlap or ping-pong yet).
//
// Why (docs/PERF.md entry 21g): the wgmma forward (forward_wgmma.cuh) issues ~790 instructions per warp
// and 64-key block around its 16 wgmma, most of them the cp.async addresses of 16 chunks per thread and
// block and the walk's integer work, and runs 8 warps an SM (82 KB of shared memory, 164 registers).
// Here one thread of a producer warpgroup issues each block's K and V as TMA copies (one instruction per
// 64 x 64 box, the 128-byte swizzle wgmma reads done by the copy engine, rows past the tensor zero-filled),
// and two consumer warpgroups of 64 query rows each (128 rows of one frame a program) share every block.
// The consumers spend their instructions on the softmax alone.
//
// A program: 128 consecutive tokens of one frame (the last program of a frame partly past its end: those
// rows are TMA's zeros, computed and not stored) of one (batch, intra head); it walks the frame in blocks
// of 64 keys, the last one masked past the frame's end (where K and V are zeros: another frame's values,
// NaN or not, never meet a zero probability).
// Synchronisation is by mbarriers alone: q_full (the two Q tiles landed), k_full / v_full per stage (the
// copy's bytes arrived), empty per stage (each consumer warp's wgmma reads of it done: 8 arrivals).
//
// The tensor maps (built per call by the launcher, local_attention.cu) see q, k and v as 5-D tensors
// (D, H*W, T, heads, B) of 2-byte elements with their strides, so a frame's end is a tensor edge; a box
// is 64 head-dim elements x 64 tokens of one frame.
#pragma once

#include <cuda.h>

#include "forward_wgmma.cuh"
#include "../hopper/tma.cuh"

namespace oasis_local {

// the three tensor maps of a forward call (kernel parameters: __grid_constant__)
struct TmaMaps {
    CUtensorMap q, k, v;
};

namespace detail {
namespace tma {

constexpr int kConsumers = 2;                        // consumer warpgroups, 64 query rows each
constexpr int kThreadsTma = 128 * (kConsumers + 1);  // + the producer warpgroup
constexpr int kRowsTma = 64 * kConsumers;            // query rows a program
constexpr int kStages = 3;                           // K/V blocks in flight
constexpr int kBlock = 64;                           // keys a block

using hopper::mbar_arrive;  // the barriers and copies of ../hopper/tma.cuh
using hopper::mbar_expect_bytes;
using hopper::mbar_init;
using hopper::mbar_wait;

// box (d0.., i0.., t, head, b) of a 5-D tensor map into shared memory, completing on `bar`
__device__ __forceinline__ void load_box(void* dst, const CUtensorMap* map, uint64_t* bar, int d0, int i0, int t,
                                         int head, int b) {
    hopper::load_box5(dst, map, bar, d0, i0, t, head, b);
}

// A TMA kernel's shared memory: Q (C tiles of 64 rows), S stages of K and V blocks (64 x D each, the wgmma
// panels, 1024-byte aligned), then the barriers: q_full, k_full and v_full per stage (the copies' bytes),
// empty per stage (each of the C consumer warpgroups' warps once its wgmma reads are done). With SPLIT, a
// stage's K and V are released apart: empty once K is read, empty_v once V is (else empty_v is empty).
template <typename T, int D, int C = kConsumers, int S = kStages, bool SPLIT = false>
struct Stages {
    static constexpr int kD = D;
    T *q, *k, *v;
    uint64_t *q_full, *k_full, *v_full, *empty, *empty_v;

    __device__ explicit Stages(unsigned char* smem) {
        q = reinterpret_cast<T*>(smem + ((1024 - (wgmma::smem_address(smem) & 1023)) & 1023));
        k = q + 64 * C * D;
        v = k + S * kBlock * D;
        q_full = reinterpret_cast<uint64_t*>(v + S * kBlock * D);
        k_full = q_full + 1;
        v_full = k_full + S;
        empty = v_full + S;
        empty_v = SPLIT ? empty + S : empty;
    }

    __device__ void init_barriers() const {  // by thread 0, before the block's barrier
        if (threadIdx.x != 0) return;
        mbar_init(q_full, 1);
        for (int s = 0; s < S; ++s) {
            mbar_init(k_full + s, 1);
            mbar_init(v_full + s, 1);
            mbar_init(empty + s, 4 * C);
            if constexpr (SPLIT) mbar_init(empty_v + s, 4 * C);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
};

// 64 tokens i0.. of frame t as a tile of D columns: D / 64 boxes, each a 64 x 64 panel of the wgmma layout
// (wgmma::swizzled); tokens past the frame's end are zeros (the map's frame dimension ends there)
template <typename T, int D>
__device__ __forceinline__ void load_tile(T* tile, const CUtensorMap* map, uint64_t* bar, int i0, int t, int head,
                                          int b) {
#pragma unroll
    for (int panel = 0; panel < D / 64; ++panel)
        load_box(tile + panel * 64 * 64, map, bar, panel * 64, i0, t, head, b);
}

// A consumer warpgroup's walk over n_blocks key blocks in S stages with FlashAttention-3's intra-warpgroup
// overlap: block j's scores S = Q K^T and block j - 1's O += P V are issued together, and block j's softmax
// runs while the P V is on the tensor cores; the O rescale waits for it. A stage's K is released (empty) once
// its scores are in, its V (empty_v, split barriers) once its P V is done, so the producer can load the next K
// while a V is still being read. mask(j, all, visible): block j's thread bits (WgSoftmax::probs).
template <typename T, int D, int S, typename St, typename Mask>
__device__ __forceinline__ void overlapped_walk(WgSoftmax<T, D>& sm, const T* q, const St& st, int n_blocks, float c,
                                                Mask mask) {
    const int lane = threadIdx.x & 31;
    auto release = [&](uint64_t* bar) {  // this warp's wgmma reads of a stage's K or V are done
        __syncwarp();
        if (lane == 0) mbar_arrive(bar);
    };
    float sc[32];
    uint32_t pa[4][4];  // the last block's probabilities as the A fragments of its P V
    float a0, a1;
    bool all;
    uint32_t visible;
    mbar_wait(st.k_full, 0);
    issue_scores_group<T, D>(sc, q, st.k);
    wgmma::wait<0>();
    wgmma::fence_operands(sc);
    release(st.empty);
    mask(0, all, visible);
    if (sm.probs(sc, c, all, visible, a0, a1)) sm.rescale(a0, a1);
    pack_a<T>(pa, sc);
    for (int it = 1; it < n_blocks; ++it) {
        const int s = it % S, sp = (it - 1) % S;
        mbar_wait(st.k_full + s, (it / S) & 1);
        issue_scores_group<T, D>(sc, q, st.k + s * kBlock * D);  // this block's scores ...
        mbar_wait(st.v_full + sp, ((it - 1) / S) & 1);
        issue_accumulate_group<T, D>(sm.o, pa, st.v + sp * kBlock * D);  // ... and the last one's P V
        wgmma::wait<1>();  // the scores are in (groups complete in order)
        wgmma::fence_operands(sc);
        release(st.empty + s);
        mask(it, all, visible);
        const bool moved = sm.probs(sc, c, all, visible, a0, a1);  // under the P V
        wgmma::wait<0>();
        fence_accumulator<D>(sm.o);
        fence_fragments(pa);
        release(st.empty_v + sp);
        if (moved) sm.rescale(a0, a1);
        pack_a<T>(pa, sc);
    }
    const int sl = (n_blocks - 1) % S;
    mbar_wait(st.v_full + sl, ((n_blocks - 1) / S) & 1);
    issue_accumulate_group<T, D>(sm.o, pa, st.v + sl * kBlock * D);
    wgmma::wait<0>();
    fence_accumulator<D>(sm.o);
    fence_fragments(pa);
    release(st.empty_v + sl);
}

// The producer's loads of n_blocks K and V blocks into S stages, K before V, each into a stage once the
// consumers released its K (empty) or its V (empty_v); load(dst, map, bar, j) issues block j's copies
template <int S, typename St, typename Load>
__device__ __forceinline__ void produce_blocks(const St& st, int n_blocks, uint32_t block_bytes, Load load) {
    for (int it = 0; it < n_blocks; ++it) {
        const int s = it % S, round = it / S;
        if (round > 0) mbar_wait<false>(st.empty + s, (round - 1) & 1);
        mbar_expect_bytes(st.k_full + s, block_bytes);
        load(st.k + s * kBlock * st.kD, true, st.k_full + s, it);
        if (round > 0) mbar_wait<false>(st.empty_v + s, (round - 1) & 1);
        mbar_expect_bytes(st.v_full + s, block_bytes);
        load(st.v + s * kBlock * st.kD, false, st.v_full + s, it);
    }
}

}  // namespace tma

template <typename T, int D>
__global__ void __launch_bounds__(tma::kThreadsTma, 1)
    forward_tma_intra_kernel(const __grid_constant__ TmaMaps maps, const ForwardParams p) {
    using namespace tma;
    static_assert(D % 64 == 0, "the head dim in 64-wide boxes");
    constexpr uint32_t kTileBytes = 64 * D * sizeof(T);
    extern __shared__ __align__(128) unsigned char smem_tma[];
    const Stages<T, D, kConsumers, kStages, true> st(smem_tma);
    T* s_q = st.q;
    uint64_t* q_full = st.q_full;

    const Layer& L = p.layer;  // the intra heads alone (the launcher's view: n_window = 0)
    const Program pr(L);
    const int HW = L.H * L.W, per_frame = (HW + kRowsTma - 1) / kRowsTma;
    if (!pr.valid || blockIdx.x >= unsigned(L.T * per_frame)) return;
    const int frame = blockIdx.x / per_frame, frame_token = frame * HW, start = (blockIdx.x % per_frame) * kRowsTma;
    const int n_blocks = (HW + kBlock - 1) / kBlock;
    const int wg = threadIdx.x / 128;

    st.init_barriers();
    __syncthreads();  // the last CTA-wide barrier: the warpgroups part here

    if (wg == kConsumers) {  // the producer: one thread issues every copy
        if (threadIdx.x % 128 == 0) {
            const int head = pr.head, b = int(pr.b);
            mbar_expect_bytes(q_full, kConsumers * kTileBytes);
            for (int c = 0; c < kConsumers; ++c)
                tma::load_tile<T, D>(s_q + c * 64 * D, &maps.q, q_full, start + 64 * c, frame, head, b);
            produce_blocks<kStages>(st, n_blocks, kTileBytes, [&](T* dst, bool is_k, uint64_t* bar, int it) {
                tma::load_tile<T, D>(dst, is_k ? &maps.k : &maps.v, bar, it * kBlock, frame, head, b);
            });
        }
        return;
    }

    // a consumer warpgroup: query rows start + 64 wg .. of the frame
    const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x & 31;
    const T* q_tile = s_q + wg * 64 * D;
    const float c = p.scale * kLog2e;
    WgSoftmax<T, D> sm;
    mbar_wait(q_full, 0);
    overlapped_walk<T, D, kStages>(sm, q_tile, st, n_blocks, c, [&](int it, bool& all, uint32_t& visible) {
        // columns past the frame's end (the last block only): thread column 8 j + 2 (lane % 4) + (e & 1)
        const int past = HW - it * kBlock;
        all = past >= kBlock;
        visible = 0;
        if (!all) {
#pragma unroll
            for (int e = 0; e < 32; ++e) visible |= uint32_t(8 * (e / 4) + 2 * (lane & 3) + (e & 1) < past) << e;
        }
    });
    const int r0 = start + 64 * wg + warp * 16 + (lane >> 2);
    sm.store(p, pr, r0 < HW ? frame_token + r0 : -1, r0 + 8 < HW ? frame_token + r0 + 8 : -1);
}

// The window heads: a program is one window tile (4 frames of bh x bw tokens, bh * bw = 16, one frame per warp
// of its consumer warpgroup, geometry.cuh's Tile) of one (batch, window head), and a producer warp. The halo is
// walked one frame at a time (4 + 2 rt frames, clipped to the clip), each frame's slice of (bh + 2 rh) x
// (bw + 2 rw) <= 64 positions one TMA box of a 5-D map (D, W, H, T * B, heads): positions outside the frame are
// the box's zeros (negative coordinates too), the slice's rows past its size stay the zeros written at the
// start. S = 2 stages (81 KB of shared memory, 160 threads): two programs share an SM (docs/PERF.md 21l).
//
// The consumer overlaps FlashAttention-3's way within its warpgroup (docs/PERF.md 21n): block j + 1's
// S = Q K^T and block j's O += P V are issued together, and block j + 1's softmax runs while the P V is on the
// tensor cores. So a stage's K is released once its S is done and its V once its P V is: split barriers, so
// that the producer can load the next K while this V is still being read.
template <typename T, int D, int S>
__global__ void __launch_bounds__(128 + 32, 2)
    forward_tma_window_kernel(const __grid_constant__ TmaMaps maps, const ForwardParams p, int bh, int bw) {
    using namespace tma;
    constexpr int kThreads = 128 + 32;
    extern __shared__ __align__(128) unsigned char smem_tma[];
    const Stages<T, D, 1, S, true> st(smem_tma);
    T *s_q = st.q, *s_k = st.k;
    uint64_t* q_full = st.q_full;

    const Layer& L = p.layer;  // the window heads alone
    const Program pr(L);
    const int nbh = (L.H + bh - 1) / bh, nbw = (L.W + bw - 1) / bw, per_t = nbh * nbw;
    const int group = blockIdx.x / per_t, rest = blockIdx.x % per_t, t0c = group * kTileT;
    if (!pr.valid || t0c >= L.T) return;
    const int h0 = (rest / nbw) * bh, w0 = (rest % nbw) * bw;
    const int sh = bh + 2 * L.rh, sw = bw + 2 * L.rw, slice = sh * sw;
    const int lo = t0c - L.rt > 0 ? t0c - L.rt : 0;
    const int hi = t0c + kTileT - 1 + L.rt < L.T - 1 ? t0c + kTileT - 1 + L.rt : L.T - 1;
    const int n_blocks = hi - lo + 1;  // every halo frame is within rt of one of the tile's frames

    // the K and V stages' rows past the slice: zeros, once (the copies never write them)
    for (int i = threadIdx.x; i < 2 * S * (D / 64) * (64 - slice) * 8; i += kThreads) {
        const int chunk = i % 8, row = slice + (i / 8) % (64 - slice), panel = i / (8 * (64 - slice));
        reinterpret_cast<uint4*>(s_k + panel * 64 * 64 + row * 64)[chunk] = make_uint4(0, 0, 0, 0);
    }
    st.init_barriers();
    wgmma::fence_smem_for_async();  // the zeros, written by ordinary stores, read by wgmma
    __syncthreads();

    const int bt = int(pr.b) * L.T;  // the map's frame index of this batch's frame 0
    if (threadIdx.x >= 128) {  // the producer warp: one thread issues every copy
        if (threadIdx.x == 128) {
            const int head = pr.head;
            constexpr uint32_t kQBoxBytes = 16 * 128;  // one frame's 16 query tokens, one 64-column panel
            mbar_expect_bytes(q_full, kTileT * (D / 64) * kQBoxBytes);
            for (int f = 0; f < kTileT; ++f)
#pragma unroll
                for (int panel = 0; panel < D / 64; ++panel)
                    load_box(s_q + panel * 64 * 64 + f * 16 * 64, &maps.q, q_full, panel * 64, w0, h0, bt + t0c + f,
                             head);
            produce_blocks<S>(st, n_blocks, (D / 64) * slice * 128, [&](T* dst, bool is_k, uint64_t* bar, int it) {
#pragma unroll
                for (int panel = 0; panel < D / 64; ++panel)
                    load_box(dst + panel * 64 * 64, is_k ? &maps.k : &maps.v, bar, panel * 64, w0 - L.rw, h0 - L.rh,
                             bt + lo + it, head);
            });
        }
        return;
    }

    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    Tile tile{};
    tile.init<kBlock>(group * per_t + rest, true, L, bh, bw);  // in range: the grid and t0c < T say so
    const uint32_t bits = tile.mask_bits<kBlock>(Block{0, 0, 0}, lane);  // the same in every frame
    const float c = p.scale * kLog2e;
    WgSoftmax<T, D> sm;
    mbar_wait(q_full, 0);
    overlapped_walk<T, D, S>(sm, s_q, st, n_blocks, c, [&](int it, bool& all, uint32_t& visible) {
        all = false;  // halo frame lo + it: the Tile's masks, none for a warp whose frame is more than rt away
        visible = tile.warp_sees(Block{it, lo + it - (tile.t0 - L.rt), 0}, warp) ? bits : 0u;
    });
    const int r0 = warp * 16 + (lane >> 2);
    sm.store(p, pr, tile.row_token(r0), tile.row_token(r0 + 8));
}

// shared memory of a forward_tma_*_kernel launch with C consumer warpgroups and S stages (+1024: the kernel
// aligns its tiles to 1024 bytes)
template <typename T, int D, int C = tma::kConsumers, int S = tma::kStages, bool SPLIT = false>
constexpr size_t tma_smem() {
    return size_t(64 * C + 2 * S * tma::kBlock) * D * sizeof(T) + (1 + (SPLIT ? 4 : 3) * S) * 8 + 1024;
}

}  // namespace detail
}  // namespace oasis_local
