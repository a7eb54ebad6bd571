// The Wan VAE's 3x3x3 causal convolution on Hopper (sm_90a): an implicit GEMM on wgmma with TMA loads and
// warp specialisation, bf16 in and out, float32 accumulation. No torch here (vae_conv.cu launches it,
// binding.cpp fills the parameters).
//
// Why (docs/PERF.md entry 18j): cuDNN's fastest engines run the decoder's 96- and 192-channel convolutions
// on tiles 128 or 64 channels wide, so a quarter of their MMA work is padding, and they take one input
// tensor, so every call first copies the causal cache's two frames in front of the new ones (124.6 GB of
// copies a 720p decode, entry 18i) and adds the bias and the residual in a pass of its own after it. Here:
// - N, the output channels of a program, is exactly 96 or 192 (m64n96k16 / m64n192k16);
// - the two cached frames and the new frames are two tensors, read where they lie: TMA takes a padded
//   frame f < 2 from `prev` (or zeros where the sequence starts) and f >= 2 from `x`;
// - bias and residual are added to the accumulator before the one bf16 store;
// - where one program holds all output channels (Cout = NT), the next layer's RMS norm and SiLU can be
//   applied there too, so the raw output never goes through memory (a norm pass less), and the output's
//   last frames written a second time, into the causal cache's tensor of the next convolution.
//
// GEMM view: M = output pixels, N = output channels, K = 27 taps x input channels. A program takes two
// segments of 64 pixels of a row (each one consumer warpgroup's 64 rows; segments run along the rows of
// the frames of the batch, so the two may lie in different rows) and NT output channels; its K loop walks
// the taps (dt, dy, dx) and, in each, the input channels in chunks of CHUNK = 64 (the launcher takes Cin
// a multiple of 64). CHUNK = 32 (64-byte rows) compiles too and ran Cin = 96 exactly, every stage the same
// wgmma, but at a third of the 64-channel stages' rate on an H100 (docs/PERF.md entry 18j): not launched. A stage holds each segment's A
// tile for the tap (64 pixels x CHUNK channels, one TMA box of the input at (x0 + dx - 1, y + dy - 1) in
// the padded frame t + dt: pixels outside the frame are TMA's zeros, which is the convolution's zero
// padding) and the B tile (NT output channels x the same CHUNK input channels, one box of the packed
// weight [Cout, 27 Cin]). Rows of CHUNK elements take the 128-byte swizzle (64) or the 64-byte one (32).
//
// Synchronisation (FlashAttention-3's producer/consumer, mbarriers only): full[s] completes when stage s's
// three boxes have landed (one arrival with their byte count, the copy engine's completions); empty[s]
// when each consumer warp's wgmma reads of stage s are done (8 arrivals). A consumer keeps one stage's
// wgmma in flight and releases the stage before it.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>

#include <cstdint>

#include "../hopper/tma.cuh"
#include "../hopper/wgmma.cuh"

namespace oasis_vae {

// the tensor maps of a call (kernel parameters: __grid_constant__): x and prev as 5-D (C, W, H, T, B)
// of CHUNK x 64 boxes, the packed weight as 2-D (27 Cin, Cout) of CHUNK x NT boxes
struct ConvMaps {
    CUtensorMap x, prev, w;
};

struct ConvParams {
    int B, T, H, W;         // the output: x's frames, height and width
    int cin;                // input channels, a multiple of CHUNK
    int cout;               // output channels, a multiple of NT
    int has_prev;           // 0: the sequence starts here (the two frames before x are zeros)
    int segments;           // B * T * H * ceil(W / 64)
    const float* bias;      // [cout] float32, or null
    const __nv_bfloat16* residual;  // [B, cout, T, H, W] with unit channel stride, or null
    int64_t r_sb, r_st, r_sh, r_sw;
    __nv_bfloat16* out;     // the same layout
    int64_t o_sb, o_st, o_sh, o_sw;
    // [cout] float32 (gamma * sqrt(cout)), or null. Given (one N tile: cout == NT, so a pixel's channels
    // are all in the program's accumulators), `out` is SiLU(y / max(||y||, 1e-12) * norm) of y = conv +
    // bias + residual: the next convolution's normalised input, without a pass of its own over y
    const float* norm;
    __nv_bfloat16* tail;    // [B, cout, T - tail_start, H, W], or null: also given out's frames t >= tail_start
    int tail_start;
    int64_t t_sb, t_st, t_sh, t_sw;
};

namespace detail {

constexpr int kConsumers = 2;                      // warpgroups of 64 pixels each
constexpr int kThreads = 128 * (kConsumers + 1);   // + the producer warpgroup
constexpr int kSeg = 64;                           // pixels a segment

// stages in flight, ~115-175 KB of shared memory (one program an SM): 4 of 64 input channels; of 32, 12 with
// N = 96 (a stage is then ~180 cycles of MMA for both warpgroups: 12 cover ~2000 cycles of TMA latency), 8
// with N = 192
template <int NT, int CHUNK>
constexpr int stages() { return CHUNK == 64 ? 4 : (NT == 96 ? 12 : 8); }

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return wgmma::smem_address(p); }

using hopper::load_box2;  // the barriers and copies of ../hopper/tma.cuh
using hopper::load_box5;
using hopper::mbar_arrive;
using hopper::mbar_expect_bytes;
using hopper::mbar_init;
using hopper::mbar_wait;

// where segment `seg` lies: batch, frame, row and first pixel
struct Segment {
    int b, t, y, x0;
    bool valid;
    __device__ Segment(int seg, const ConvParams& p) {
        const int per_row = (p.W + kSeg - 1) / kSeg;
        valid = seg < p.segments;
        x0 = (seg % per_row) * kSeg;
        int rest = seg / per_row;
        y = rest % p.H;
        rest /= p.H;
        t = rest % p.T;
        b = rest / p.T;
    }
};

// d (+)= A B, m64n96k16, bf16 in, f32 accumulate: A (64 x 16) and B (given as 96 x 16) both K-major in
// shared memory; `accumulate` false overwrites d
__device__ __forceinline__ void mma_m64n96(float (&d)[48], uint64_t a, uint64_t b, bool accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %50, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n96k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47"
        "}, %48, %49, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47])
        : "l"(a), "l"(b), "r"(int(accumulate)));
}

// d (+)= A B, m64n192k16, bf16 in, f32 accumulate: A (64 x 16) and B (given as 192 x 16) both K-major in
// shared memory; `accumulate` false overwrites d
__device__ __forceinline__ void mma_m64n192(float (&d)[96], uint64_t a, uint64_t b, bool accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %98, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n192k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95"
        "}, %96, %97, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
          "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
          "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
          "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
          "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95])
        : "l"(a), "l"(b), "r"(int(accumulate)));
}

template <int NT>
struct Mma;
template <>
struct Mma<96> {
    static __device__ __forceinline__ void run(float (&d)[48], uint64_t a, uint64_t b, bool acc) {
        mma_m64n96(d, a, b, acc);
    }
};
template <>
struct Mma<192> {
    static __device__ __forceinline__ void run(float (&d)[96], uint64_t a, uint64_t b, bool acc) {
        mma_m64n192(d, a, b, acc);
    }
};

// A 64-row tile of CHUNK-element rows in the swizzle wgmma and TMA share: 128-byte rows (CHUNK 64) or
// 64-byte rows (CHUNK 32), 8 rows an atom. K-major descriptors: k-step ks of 16 elements is 32 bytes into
// the row, 8-row groups one atom apart (the leading byte offset unused)
template <int CHUNK>
struct Swizzle {
    static_assert(CHUNK == 64 || CHUNK == 32, "rows of 128 or 64 bytes");
    static constexpr uint32_t kAtom = 8 * CHUNK * 2;
    static constexpr uint64_t kMode = CHUNK == 64 ? 1 : 2;  // the descriptor's field: 1 = 128-byte, 2 = 64-byte
    static __device__ __forceinline__ uint64_t k_major(const void* tile, int ks) {
        const uint32_t addr = smem_addr(static_cast<const char*>(tile) + ks * 32);
        return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t(kAtom >> 4) << 32) | (kMode << 62);
    }
};

// shared memory: stages x (two A tiles, one B tile), 1024-byte aligned (the largest swizzle atom), then
// the barriers full[stages] and empty[stages]
template <int NT, int CHUNK>
struct Smem {
    static constexpr int kStages = stages<NT, CHUNK>();
    static constexpr int kTileA = kSeg * CHUNK;
    static constexpr int kTileB = NT * CHUNK;
    static constexpr int kStageElems = kConsumers * kTileA + kTileB;
    static_assert((kTileA * 2) % 1024 == 0 && (kTileB * 2) % 1024 == 0, "tiles start on 1024-byte boundaries");
    static constexpr size_t kBytes = size_t(kStages) * kStageElems * 2 + 2 * kStages * sizeof(uint64_t) + 1024;
    __nv_bfloat16* base;
    uint64_t *full, *empty;
    __device__ explicit Smem(unsigned char* smem) {
        base = reinterpret_cast<__nv_bfloat16*>(smem + ((1024 - (smem_addr(smem) & 1023)) & 1023));
        full = reinterpret_cast<uint64_t*>(base + kStages * kStageElems);
        empty = full + kStages;
    }
    __device__ __nv_bfloat16* a(int stage, int g) const { return base + stage * kStageElems + g * kTileA; }
    __device__ __nv_bfloat16* b(int stage) const { return base + stage * kStageElems + kConsumers * kTileA; }
};

}  // namespace detail

template <int NT, int CHUNK>
__global__ void __launch_bounds__(detail::kThreads, 1)
    conv3d_k3_kernel(const __grid_constant__ ConvMaps maps, const ConvParams p) {
    using namespace detail;
    static_assert(NT == 96 || NT == 192, "N tiles of 96 or 192 output channels");
    using Sm = Smem<NT, CHUNK>;
    using Sw = Swizzle<CHUNK>;
    constexpr int kStages = Sm::kStages;
    constexpr uint32_t kStageBytes = uint32_t(Sm::kStageElems) * 2;
    extern __shared__ __align__(128) unsigned char smem_conv[];
    const Sm sm(smem_conv);
    const int wg = threadIdx.x / 128;
    const int n0 = blockIdx.y * NT;
    const int chunks = p.cin / CHUNK, n_k = 27 * chunks;

    if (threadIdx.x == 0) {
        for (int s = 0; s < kStages; ++s) {
            mbar_init(sm.full + s, 1);
            mbar_init(sm.empty + s, 4 * kConsumers);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == kConsumers) {  // the producer warpgroup: one thread issues every copy
        if (threadIdx.x != kConsumers * 128) return;
        const Segment s0(2 * blockIdx.x, p), s1(2 * blockIdx.x + 1, p);
        for (int k = 0; k < n_k; ++k) {
            const int stage = k % kStages;
            if (k >= kStages) mbar_wait<false>(sm.empty + stage, ((k / kStages) - 1) & 1);
            const int tap = k / chunks, c0 = (k % chunks) * CHUNK;
            const int dt = tap / 9, dy = (tap / 3) % 3, dx = tap % 3;
            mbar_expect_bytes(sm.full + stage, kStageBytes);
#pragma unroll
            for (int g = 0; g < kConsumers; ++g) {
                const Segment& s = g == 0 ? s0 : s1;
                const int f = s.t + dt;  // the padded frame: 0 and 1 are the cached ones
                // a segment past the last (an odd count) loads the first segment's batch: in range (a box
                // wholly outside the tensor is not documented to complete), never stored
                const int b = s.valid ? s.b : s0.b;
                if (f < 2 && p.has_prev)
                    load_box5(sm.a(stage, g), &maps.prev, sm.full + stage, c0, s.x0 + dx - 1, s.y + dy - 1, f, b);
                else  // frame f - 2 of x; before the sequence (f < 2 without prev) TMA's zeros
                    load_box5(sm.a(stage, g), &maps.x, sm.full + stage, c0, s.x0 + dx - 1, s.y + dy - 1, f - 2, b);
            }
            load_box2(sm.b(stage), &maps.w, sm.full + stage, tap * p.cin + c0, n0);
        }
        return;
    }

    // a consumer warpgroup: 64 pixels x NT channels
    const Segment seg(2 * blockIdx.x + wg, p);
    float acc[NT / 2];
    for (int k = 0; k < n_k; ++k) {
        const int stage = k % kStages;
        mbar_wait(sm.full + stage, (k / kStages) & 1);
        wgmma::fence_operands(acc);
        wgmma::fence();
#pragma unroll
        for (int ks = 0; ks < CHUNK / 16; ++ks)
            Mma<NT>::run(acc, Sw::k_major(sm.a(stage, wg), ks), Sw::k_major(sm.b(stage), ks), k > 0 || ks > 0);
        wgmma::commit();
        wgmma::wait<1>();  // the stage before this one is read: release it
        wgmma::fence_operands(acc);
        if (k > 0 && (threadIdx.x & 31) == 0) mbar_arrive(sm.empty + (k - 1) % kStages);
    }
    wgmma::wait<0>();
    wgmma::fence_operands(acc);
    if (!seg.valid) return;

    // accumulator element 4j + e of a thread: pixel row 16 warp + lane / 4 (+ 8 for e >= 2), channel
    // 8j + 2 (lane % 4) + (e & 1): a pixel's NT channels lie in the four threads of a quad
    const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x & 31;
    const bool to_tail = p.tail != nullptr && seg.t >= p.tail_start;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int x = seg.x0 + 16 * warp + lane / 4 + 8 * half;
        const bool inside = x < p.W;  // a quad's four threads agree; all of them take part in the shuffles
        const __nv_bfloat16* res = p.residual == nullptr || !inside
                                       ? nullptr
                                       : p.residual + seg.b * p.r_sb + seg.t * p.r_st + seg.y * p.r_sh + x * p.r_sw;
        float ss = 0.f;
#pragma unroll
        for (int j = 0; j < NT / 8; ++j) {
            const int n = n0 + 8 * j + 2 * (lane & 3);
            float& v0 = acc[4 * j + 2 * half];
            float& v1 = acc[4 * j + 2 * half + 1];
            if (p.bias != nullptr) {
                v0 += p.bias[n];
                v1 += p.bias[n + 1];
            }
            if (res != nullptr) {
                const __nv_bfloat162 r = *reinterpret_cast<const __nv_bfloat162*>(res + n);
                v0 += __bfloat162float(r.x);
                v1 += __bfloat162float(r.y);
            }
            if (p.norm != nullptr) ss += v0 * v0 + v1 * v1;
        }
        if (p.norm != nullptr) {  // the pixel's sum of squares over its quad, then F.normalize's eps
            ss += __shfl_xor_sync(0xffffffffu, ss, 1);
            ss += __shfl_xor_sync(0xffffffffu, ss, 2);
            const float inv = 1.f / fmaxf(sqrtf(ss), 1e-12f);
#pragma unroll
            for (int j = 0; j < NT / 8; ++j) {
                const int n = n0 + 8 * j + 2 * (lane & 3);
                float& v0 = acc[4 * j + 2 * half];
                float& v1 = acc[4 * j + 2 * half + 1];
                v0 *= inv * p.norm[n];
                v1 *= inv * p.norm[n + 1];
                v0 = __fdividef(v0, 1.f + __expf(-v0));  // SiLU
                v1 = __fdividef(v1, 1.f + __expf(-v1));
            }
        }
        if (!inside) continue;
        __nv_bfloat16* out = p.out + seg.b * p.o_sb + seg.t * p.o_st + seg.y * p.o_sh + x * p.o_sw;
        __nv_bfloat16* tail = to_tail ? p.tail + seg.b * p.t_sb + (seg.t - p.tail_start) * p.t_st + seg.y * p.t_sh +
                                            x * p.t_sw
                                      : nullptr;
#pragma unroll
        for (int j = 0; j < NT / 8; ++j) {
            const int n = n0 + 8 * j + 2 * (lane & 3);
            const __nv_bfloat162 v = __floats2bfloat162_rn(acc[4 * j + 2 * half], acc[4 * j + 2 * half + 1]);
            *reinterpret_cast<__nv_bfloat162*>(out + n) = v;
            if (tail != nullptr) *reinterpret_cast<__nv_bfloat162*>(tail + n) = v;
        }
    }
}

}  // namespace oasis_vae
