// The Wan VAE decoder's output convolution (96 -> 3 channels, 3x3x3, causal) in CUDA: mma.sync with a row's
// three horizontal taps as the GEMM's columns, bf16 in and out, float32 sums. No torch here (few_out.cu
// launches it, binding.cpp fills the call). Built for sm_90a with the rest of csrc/vae_conv/, but nothing in it
// is Hopper's own (mma.sync, ldmatrix, cp.async: sm_80).
//
// Why (docs/PERF.md entry 18p): cuDNN runs this layer as an implicit GEMM on tiles 64 output channels wide for
// 3 real ones, 21x the MMA work: ~1.5 ms a 2-frame 720p piece on an H100 (25 ms a decode), where its input
// (four frames of 96 channels, 708 MB) takes ~0.2 ms to read once. And it takes one input tensor, so every
// call first copies the causal cache's two frames in front of the new ones.
//
// GEMM view. For one output row y and one (dt, dy), Q[p, (dx, o)] = sum_c in[t + dt][y + dy - 1][p][c] *
// W[o][c][dt][dy][dx] over the input pixels p of the row: K = the input channels, N = 3 Cout columns
// (n = dx Cout + o) padded to 16. Summed over dt, dy and the channels in the accumulators, the output is
// y[w][o] = bias[o] + sum_dx Q[w + dx][dx Cout + o], where the tile's input pixels start one left of its first
// output pixel. So each input row's A fragment serves its three horizontal taps, and N is padded 16 / 9,
// not 64 / 3.
//
// A program: output frame t (of the padded sequence's frames t, t + 1, t + 2: frames 0 and 1 are the cached
// ones, `prev`, or zeros where the sequence starts; frame f >= 2 is x's f - 2), kRows output rows from y0
// and kOut = 126 output pixels from x0. Its input tile is kRows + 2 rows (y0 - 1 ..) of 128 pixels (x0 - 1 ..).
// Eight warps; warp w owns the tile's input pixels [16 w, 16 w + 16) in every row, and its accumulators are
// acc[r][n tile] for the kRows output rows and the two 8-column n tiles. A stage is one (dt, 16-channel
// chunk): the tile's input values by cp.async (zero-filled outside the frame, which is the convolution's
// zero padding, and for frames before the sequence starts), kStages in flight. In a stage a warp loads each
// input row i's A fragment once (ldmatrix.x4) and adds it into the output rows r = i - dy it feeds (two
// mma.sync m16n8k16 each). The B fragments come from global memory in fragment order (the packed weight,
// 27 KB at 96 channels, read by every program: L1/L2-resident), a stage ahead. The epilogue writes the accumulators to shared
// memory (Q) and sums the three taps of each output pixel there.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace oasis_vae {

struct FewOutParams {
    const __nv_bfloat16* x;          // [B, cin, T, H, W], unit channel stride
    int64_t x_sb, x_st, x_sh, x_sw;
    const __nv_bfloat16* prev;       // [B, cin, 2, H, W], or null: zeros
    int64_t p_sb, p_st, p_sh, p_sw;
    const uint2* weight;             // [3 dt][3 dy][cin / 16][2 n tiles][32 lanes] x 4 bf16 (fragment order)
    const float* bias;               // [cout], or null
    __nv_bfloat16* out;              // [B, cout, T, H, W], any strides
    int64_t o_sb, o_sc, o_st, o_sh, o_sw;
    int B, T, H, W, cin, cout;
    int tiles_w, tiles_h;
};

namespace few_out {

constexpr int kRows = 4;                       // output rows a program
constexpr int kInRows = kRows + 2;             // input rows of its tile
constexpr int kPix = 128;                      // input pixels a row of the tile
constexpr int kOut = kPix - 2;                 // output pixels a row
constexpr int kWarps = kPix / 16;              // one 16-pixel m tile each
constexpr int kThreads = 32 * kWarps;
constexpr int kStages = 4;                     // stages in flight
constexpr int kStageElems = kInRows * kPix * 16;
constexpr int kSmemBytes = kStages * kStageElems * 2;  // 96 KB: two programs an SM
constexpr int kN = 16;                         // GEMM columns (dx, o), padded
constexpr int kMaxCout = kN / 3;               // 5
static_assert(kThreads == 2 * kPix, "a thread loads one half (8 channels) of one pixel of each row");
static_assert(kRows * kPix * kN * 4 <= kSmemBytes, "Q fits where the stages were");

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared; zero-filled (nothing read) where !valid
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Where the 8 channels (half h of the chunk's 16) of input row i's pixel p lie in a stage, in elements. A pixel
// is 32 bytes; the halves of pixels 4-7 of every 8 are swapped, so that the 8 rows ldmatrix reads at once
// (8 pixels, one half) fall in 8 different 16-byte bank groups.
__device__ __forceinline__ int chunk_offset(int i, int p, int h) {
    return ((i * kPix + p) * 2 + (h ^ ((p >> 2) & 1))) * 8;
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&a)[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
                 : "r"(smem_addr(row)));
}

// d += a (16 x 16, row-major) * b (16 x 8, column-major), bf16 in, float32 sums
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

}  // namespace few_out

__global__ void __launch_bounds__(few_out::kThreads, 2) conv3d_few_out_kernel(const FewOutParams p) {
    using namespace few_out;
    extern __shared__ __align__(128) unsigned char smem[];
    __nv_bfloat16* const stages = reinterpret_cast<__nv_bfloat16*>(smem);

    // programs of one tile's output frames are neighbours: they read the same input frames (from L2)
    int block = blockIdx.x;
    const int t = block % p.T;
    block /= p.T;
    const int x0 = (block % p.tiles_w) * kOut;
    block /= p.tiles_w;
    const int y0 = (block % p.tiles_h) * kRows;
    const int b = block / p.tiles_h;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int chunks = p.cin / 16, n_stages = 3 * chunks;

    // a thread copies half tid & 1 of pixel tid / 2 of every row of a stage
    const int lp = tid >> 1, lh = tid & 1;
    const int gx = x0 - 1 + lp;
    const bool col_ok = gx >= 0 && gx < p.W;
    auto issue = [&](int s) {
        const int dt = s / chunks, c0 = (s - dt * chunks) * 16;
        const int f = t + dt;
        const bool cached = f < 2;
        const bool frame_ok = !cached || p.prev != nullptr;
        const __nv_bfloat16* base = cached ? (frame_ok ? p.prev + b * p.p_sb + f * p.p_st : p.x)
                                           : p.x + b * p.x_sb + (f - 2) * p.x_st;
        const int64_t sh = cached ? p.p_sh : p.x_sh, sw = cached ? p.p_sw : p.x_sw;
        __nv_bfloat16* dst = stages + (s % kStages) * kStageElems;
#pragma unroll
        for (int i = 0; i < kInRows; ++i) {
            const int gy = y0 - 1 + i;
            const bool ok = frame_ok && col_ok && gy >= 0 && gy < p.H;
            // a row not read still needs an address: x's start
            const __nv_bfloat16* src = ok ? base + gy * sh + gx * sw + c0 + lh * 8 : p.x;
            cp_async16(dst + chunk_offset(i, lp, lh), src, ok);
        }
    };

    float acc[kRows][2][4];
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[r][n][e] = 0.f;

#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (s < n_stages) issue(s);
        cp_async_commit();  // empty groups too: the count wait_group relies on
    }
    // ldmatrix.x4: lanes 8j .. 8j + 7 give the rows of matrix j = (pixels 8 (j & 1) .., channel half j >> 1),
    // which lands in a[j] as the m16n8k16 A fragment wants it
    const int a_pixel = 16 * warp + (lane & 7) + 8 * ((lane >> 3) & 1), a_half = lane >> 4;
    // stage s's B fragments, [dy][n tile]: loaded a stage ahead, so that the MMAs do not wait on them
    const uint2* const wlane = p.weight + lane;
    auto load_b = [&](int s, uint32_t (&bf)[3][2][2]) {
        const int dt = s / chunks, chunk = s - dt * chunks;
#pragma unroll
        for (int dy = 0; dy < 3; ++dy)
#pragma unroll
            for (int n = 0; n < 2; ++n) {
                const uint2 v = __ldg(wlane + ((((dt * 3 + dy) * chunks + chunk) * 2 + n) << 5));
                bf[dy][n][0] = v.x;
                bf[dy][n][1] = v.y;
            }
    };
    uint32_t bf[3][2][2], bf_next[3][2][2];
    load_b(0, bf);
    for (int s = 0; s < n_stages; ++s) {
        cp_async_wait<kStages - 2>();
        __syncthreads();  // stage s landed for all; all are done with stage s - 1, whose slot is refilled next
        if (s + kStages - 1 < n_stages) issue(s + kStages - 1);
        cp_async_commit();
        if (s + 1 < n_stages) load_b(s + 1, bf_next);
        const __nv_bfloat16* tile = stages + (s % kStages) * kStageElems;
#pragma unroll
        for (int i = 0; i < kInRows; ++i) {
            uint32_t a[4];
            ldmatrix_x4(a, tile + chunk_offset(i, a_pixel, a_half));
#pragma unroll
            for (int dy = 0; dy < 3; ++dy) {
                const int r = i - dy;  // input row i is output row r's row dy
                if (r < 0 || r >= kRows) continue;
                mma16816(acc[r][0], a, bf[dy][0]);
                mma16816(acc[r][1], a, bf[dy][1]);
            }
        }
#pragma unroll
        for (int dy = 0; dy < 3; ++dy)
#pragma unroll
            for (int n = 0; n < 2; ++n) {
                bf[dy][n][0] = bf_next[dy][n][0];
                bf[dy][n][1] = bf_next[dy][n][1];
            }
    }
    cp_async_wait<0>();
    __syncthreads();  // every warp's last ldmatrix is done: Q takes the stages' place

    // Q[r][input pixel][n]: the m16n8 accumulator holds rows (pixels) lane / 4 and + 8, columns 2 (lane % 4), + 1
    float* const q = reinterpret_cast<float*>(smem);
    const int g = lane >> 2, c2 = (lane & 3) * 2;
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
        for (int n = 0; n < 2; ++n) {
            const int px = 16 * warp + g, col = 8 * n + c2;
            *reinterpret_cast<float2*>(q + (r * kPix + px) * kN + col) = make_float2(acc[r][n][0], acc[r][n][1]);
            *reinterpret_cast<float2*>(q + (r * kPix + px + 8) * kN + col) = make_float2(acc[r][n][2], acc[r][n][3]);
        }
    __syncthreads();

    // y[r][w][o] = bias[o] + sum_dx Q[r][w + dx][dx cout + o]; consecutive threads take consecutive (w, o)
    const int per_row = kOut * p.cout;
    __nv_bfloat16* const out = p.out + b * p.o_sb + t * p.o_st;
    for (int e = tid; e < kRows * per_row; e += kThreads) {
        const int r = e / per_row, rem = e - r * per_row;
        const int w = rem / p.cout, o = rem - w * p.cout;
        const int gy = y0 + r, gxo = x0 + w;
        if (gy >= p.H || gxo >= p.W) continue;
        const float* qr = q + (r * kPix + w) * kN + o;
        float v = p.bias != nullptr ? p.bias[o] : 0.f;
        v += qr[0];
        v += qr[kN + p.cout];
        v += qr[2 * kN + 2 * p.cout];
        out[gy * p.o_sh + gxo * p.o_sw + o * p.o_sc] = __float2bfloat16(v);
    }
}

}  // namespace oasis_vae
