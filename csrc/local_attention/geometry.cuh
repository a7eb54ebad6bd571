// Tile geometry of the local-attention kernels (kernels.cuh): which tokens a program's rows are,
// which blocks it walks, which tokens each thread loads, and which scores each thread keeps.
// Host and device code (no intrinsics), so tests/cuda/geometry_check.cu checks it on the CPU
// against the masks' definition (tests/test_cuda_local.py builds and runs it with nvcc).
//
// A program's 64 rows are four warps of 16:
//   * window heads: a box of 4 frames x bh x bw tokens (bh * bw = 16, bw a power of two), one
//     frame per warp. Its halo is walked one frame at a time, each frame in slices of
//     (bh + 2rh) x (bw + 2rw) positions, BLOCK_N per block, slice-major (every frame of slice 0,
//     then of slice 1, ...). A warp sees a block only if its frame is within rt of the block's.
//   * intra-frame heads: 64 consecutive tokens of a frame; the walk is the frame in blocks of
//     BLOCK_N, only the last, partial block masked.
#pragma once

#include <cstdint>

#include "local_attention.h"

namespace oasis_local {
namespace detail {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRows = 16 * kWarps;  // rows of a tile
constexpr int kTileT = kWarps;      // frames of a window tile

// the shapes a warp's 16 rows can take in a frame (bh x bw); the launchers pick one per layer
constexpr TileShape kTileShapes[] = {{4, 4}, {2, 8}, {8, 2}, {1, 16}, {16, 1}};

__host__ __device__ inline int log2_of(int pow2) {
    int s = 0;
    while ((1 << s) < pow2) ++s;
    return s;
}

// one block of a walk: its index, and for window heads its halo frame (0 .. 4+2rt-1, frame
// t0 - rt + f) and slice; for intra heads the slice is the block index
struct Block {
    int it, f, s;
};

struct Tile {
    bool window;
    int T, H, W, HW;
    int rt, rh, rw, bh, bw, bw_shift;
    int t0, h0, w0;  // window: the box origin
    int f_base;      // intra: first token of the frame; start: first position in it
    int start;
    // the walk
    int sh, sw, slice;  // window: halo slice sides and size
    int f_lo, nf;       // window: halo frames f_lo .. f_lo+nf-1
    int n_sub, n_blocks;

    template <int BLOCK_N>
    __host__ __device__ bool init(int p, bool is_window, const Layer& L, int bh_, int bw_) {
        window = is_window;
        T = L.T; H = L.H; W = L.W; HW = H * W;
        rt = L.rt; rh = L.rh; rw = L.rw; bh = bh_; bw = bw_;
        bw_shift = log2_of(bw);
        if (window) {
            const int nbh = (H + bh - 1) / bh, nbw = (W + bw - 1) / bw;
            const int nbt = (T + kTileT - 1) / kTileT;
            if (p >= nbt * nbh * nbw) return false;
            t0 = (p / (nbh * nbw)) * kTileT;
            h0 = ((p / nbw) % nbh) * bh;
            w0 = (p % nbw) * bw;
            sh = bh + 2 * rh;
            sw = bw + 2 * rw;
            slice = sh * sw;
            n_sub = (slice + BLOCK_N - 1) / BLOCK_N;
            f_lo = rt - t0 > 0 ? rt - t0 : 0;
            const int f_hi = kTileT + 2 * rt < T - t0 + rt ? kTileT + 2 * rt : T - t0 + rt;
            nf = f_hi - f_lo;
            n_blocks = nf * n_sub;
        } else {
            const int per_frame = (HW + kRows - 1) / kRows;
            if (p >= T * per_frame) return false;
            f_base = (p / per_frame) * HW;
            start = (p % per_frame) * kRows;
            n_sub = 1;
            n_blocks = (HW + BLOCK_N - 1) / BLOCK_N;
        }
        return true;
    }

    // token of row r of the tile, -1 outside the grid
    __host__ __device__ int row_token(int r) const {
        if (window) {
            const int i = r & 15;
            const int t = t0 + (r >> 4), h = h0 + (i >> bw_shift), w = w0 + (i & (bw - 1));
            return (t < T && h < H && w < W) ? (t * H + h) * W + w : -1;
        }
        const int n = start + r;
        return n < HW ? f_base + n : -1;
    }

    __host__ __device__ Block first_block() const { return Block{0, window ? f_lo : 0, 0}; }

    // the block after b (counters, so the walk divides by nothing)
    __host__ __device__ Block next(Block b) const {
        if (!window) return Block{b.it + 1, 0, b.it + 1};
        return b.f + 1 < f_lo + nf ? Block{b.it + 1, b.f + 1, b.s} : Block{b.it + 1, f_lo, b.s + 1};
    }

    // window: the offset within its frame (h * W + w) of position c of slice s, -1 where missing
    template <int BLOCK_N>
    __host__ __device__ int slice_offset(int s, int c) const {
        const int j = s * BLOCK_N + c;
        const int h = h0 - rh + j / sw, w = w0 - rw + j % sw;
        return (j < slice && h >= 0 && h < H && w >= 0 && w < W) ? h * W + w : -1;
    }

    // window: the first token of block b's frame
    __host__ __device__ int frame_token(Block b) const { return (t0 - rt + b.f) * HW; }

    // whether warp `warp`'s rows see anything of block b (window: the frames are close enough)
    __host__ __device__ bool warp_sees(Block b, int warp) const {
        if (!window) return true;
        const int df = b.f - warp;  // key frame - query frame + rt
        return t0 + warp < T && df >= 0 && df <= 2 * rt;
    }

    // whether block b needs a mask at all (intra: only the frame's last, partial block)
    template <int BLOCK_N>
    __host__ __device__ bool masked(Block b) const {
        return window || (b.it + 1) * BLOCK_N > HW;
    }

    // lane `lane`'s visibility bits for block b's columns: bit 4n + e is accumulator element e of
    // n-tile n, i.e. row g + 8(e/2) (g = lane/4) of the warp's 16, column 8n + 2(lane%4) + e%2.
    // Window: the same for every frame of a slice (the frame distance is warp_sees'); one
    // division per call, the columns stepped from the first.
    template <int BLOCK_N>
    __host__ __device__ uint32_t mask_bits(Block b, int lane) const {
        uint32_t bits = 0;
        if (window) {
            const int g = lane >> 2;
            const int ib0 = g >> bw_shift, ic0 = g & (bw - 1);
            const int ib1 = (g + 8) >> bw_shift, ic1 = (g + 8) & (bw - 1);
            const unsigned span_h = 2 * rh, span_w = 2 * rw;
            const int j0 = b.s * BLOCK_N + 2 * (lane & 3);
            int jb = j0 / sw, jc = j0 - jb * sw;
            const int q8 = 8 / sw, r8 = 8 - q8 * sw;
#pragma unroll
            for (int n = 0; n < BLOCK_N / 8; ++n) {
#pragma unroll
                for (int c2 = 0; c2 < 2; ++c2) {
                    int cb = jb, cc = jc + c2;
                    if (cc >= sw) { cc -= sw; ++cb; }
                    const bool key = cb < sh && unsigned(h0 - rh + cb) < unsigned(H) &&
                                     unsigned(w0 - rw + cc) < unsigned(W);
                    const bool v0 = key && unsigned(cb - ib0) <= span_h && unsigned(cc - ic0) <= span_w;
                    const bool v1 = key && unsigned(cb - ib1) <= span_h && unsigned(cc - ic1) <= span_w;
                    bits |= (uint32_t(v0) << (4 * n + c2)) | (uint32_t(v1) << (4 * n + 2 + c2));
                }
                jc += r8;
                jb += q8;
                if (jc >= sw) { jc -= sw; ++jb; }
            }
        } else {
#pragma unroll
            for (int n = 0; n < BLOCK_N / 8; ++n) {
#pragma unroll
                for (int c2 = 0; c2 < 2; ++c2) {
                    const uint32_t ok = b.it * BLOCK_N + 8 * n + 2 * (lane & 3) + c2 < HW;
                    bits |= (ok << (4 * n + c2)) | (ok << (4 * n + 2 + c2));
                }
            }
        }
        return bits;
    }
};

// The tokens of the rows this thread loads of each block of the walk (N rows, STRIDE apart from
// row `first`). Window heads: their offsets within a frame depend only on the slice, so they are
// computed (with two divisions each) once per slice, and a block's tokens are one add per row.
template <int N, int STRIDE, int BLOCK_N>
struct RowTokens {
    static constexpr int kRowsPerThread = N;
    int first, slice = -1;
    int off[N];

    __host__ __device__ explicit RowTokens(int first_) : first(first_) {}

    __host__ __device__ void at(const Tile& tile, Block b, int (&tok)[N]) {
        if (tile.window) {
            if (b.s != slice) {
                slice = b.s;
#pragma unroll
                for (int i = 0; i < N; ++i) off[i] = tile.slice_offset<BLOCK_N>(b.s, first + i * STRIDE);
            }
            const int base = tile.frame_token(b);
#pragma unroll
            for (int i = 0; i < N; ++i) tok[i] = off[i] < 0 ? -1 : base + off[i];
        } else {
#pragma unroll
            for (int i = 0; i < N; ++i) {
                const int n = b.it * BLOCK_N + first + i * STRIDE;
                tok[i] = n < tile.HW ? tile.f_base + n : -1;
            }
        }
    }
};

// the rows of a BLOCK_N-row tile that thread x loads (kernels.cuh's load_rows): chunk x % (D/8)
// of rows x / (D/8) + i * kThreads / (D/8)
template <int D, int BLOCK_N>
using TileRows = RowTokens<BLOCK_N * (D / 8) / kThreads, kThreads / (D / 8), BLOCK_N>;

}  // namespace detail
}  // namespace oasis_local
