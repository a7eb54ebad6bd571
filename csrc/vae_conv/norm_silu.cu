// The VAE's norm pass in CUDA: SiLU(RMSNorm over channels of y), y = x + bias (+ residual, rounded to x's dtype as
// a separate pass would store it), for channels-last 16-bit activations. No torch here: binding.cpp fills the call.
//
// Why a kernel of its own (docs/PERF.md entries 18w, 18y): the Triton pass, one tile of [channels x positions] a
// program, moved its bytes at 56-86% of a copy's rate depending on the width, whatever its tile. Here one warp streams
// units of 96 16-byte vectors (1536 contiguous bytes: 8 positions of 96 channels, 4 of 192, 2 of 384) with two units'
// loads in flight, every load and store a whole coalesced 512-byte row, and each position's sum of squares reduced
// inside the warp (three vectors a lane, then shuffles across the position's lanes), for every width alike: 77-90% of
// a copy's rate on an H100, 3-27% faster than the Triton tile (entry 18y).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "vae_conv.h"

namespace oasis_vae {

namespace {

constexpr int kLanes = 32;
constexpr int kVecsPerLane = 3;                   // a unit: 96 vectors of 8 channels
constexpr int kUnitVecs = kLanes * kVecsPerLane;
constexpr int kWarps = 8;
constexpr int kUnroll = 2;                        // units a warp has in flight
constexpr int kMaxChannels = 768;                 // 24 * 2^5: 32 lanes a position

struct NormParams {
    const uint4* x;
    uint4* out;
    const uint4* residual;
    uint4* sum;
    uint4* tail;
    const float* gamma;  // gamma * scale, float32 [C]
    const float* bias;   // float32 [C] or null
    int64_t x_sb, o_sb, r_sb, z_sb, t_sb;  // batch strides in vectors
    int64_t vecs;        // vectors per batch: positions * C / 8
    int64_t units_per_batch, units;
    int64_t tail_start;  // the first position written to tail too
    int C, vp, group;    // channels, vectors per position (C / 8), lanes per position in the reduction (vp / 3)
    float eps;
};

template <typename T>
struct Pair;
template <>
struct Pair<__nv_bfloat16> {
    using type = __nv_bfloat162;
    static __device__ float2 to_float2(type v) { return __bfloat1622float2(v); }
    static __device__ type from_float2(float2 f) { return __float22bfloat162_rn(f); }
};
template <>
struct Pair<__half> {
    using type = __half2;
    static __device__ float2 to_float2(type v) { return __half22float2(v); }
    static __device__ type from_float2(float2 f) { return __float22half2_rn(f); }
};

template <typename T>
__device__ __forceinline__ void unpack(const uint4& v, float (&f)[8]) {
    const auto* p = reinterpret_cast<const typename Pair<T>::type*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 two = Pair<T>::to_float2(p[i]);
        f[2 * i] = two.x;
        f[2 * i + 1] = two.y;
    }
}

template <typename T>
__device__ __forceinline__ uint4 pack(const float (&f)[8]) {
    uint4 v;
    auto* p = reinterpret_cast<typename Pair<T>::type*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) p[i] = Pair<T>::from_float2(make_float2(f[2 * i], f[2 * i + 1]));
    return v;
}

// 8 channels' floats from shared memory (two 16-byte reads)
__device__ __forceinline__ void channels(float (&f)[8], const float* s) {
    const float4 a = *reinterpret_cast<const float4*>(s), b = *reinterpret_cast<const float4*>(s + 4);
    f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w; f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}

__device__ __forceinline__ void add_channels(float (&f)[8], const float* s) {
    float g[8];
    channels(g, s);
#pragma unroll
    for (int e = 0; e < 8; ++e) f[e] += g[e];
}

// streaming loads: each byte is read once
__device__ __forceinline__ uint4 load(const uint4* p) { return __ldcs(p); }

template <typename T, bool kBias, bool kResidual, bool kSum, bool kTail, bool kSilu>
__global__ void __launch_bounds__(kWarps* kLanes, 2) norm_silu_kernel(const NormParams p) {
    __shared__ float parts[kWarps][kUnroll][kUnitVecs];  // each vector's sum of squares
    // gamma and bias by blocks of 8 channels, 12 floats apart: a warp's 16-byte reads of consecutive blocks
    // fall on distinct banks
    __shared__ __align__(16) float gamma_s[kMaxChannels / 8 * 12], bias_s[kMaxChannels / 8 * 12];
    for (int c = threadIdx.x; c < p.C; c += blockDim.x) {
        gamma_s[c / 8 * 12 + c % 8] = p.gamma[c];
        bias_s[c / 8 * 12 + c % 8] = kBias ? p.bias[c] : 0.f;
    }
    __syncthreads();
    const int lane = threadIdx.x % kLanes, warp = threadIdx.x / kLanes;
    // a unit starts at a position's first vector (96 is a multiple of vp), so a lane's three vectors hold the
    // same channels and positions in every unit
    int pos[kVecsPerLane], cb[kVecsPerLane];
#pragma unroll
    for (int i = 0; i < kVecsPerLane; ++i) {
        const int w = i * kLanes + lane;
        pos[i] = w / p.vp;
        cb[i] = (w % p.vp) * 12;
    }
    const int64_t stride = int64_t(gridDim.x) * kWarps * kUnroll;
    for (int64_t u0 = (int64_t(blockIdx.x) * kWarps + warp) * kUnroll; u0 < p.units; u0 += stride) {
        uint4 v[kUnroll][kVecsPerLane], r[kUnroll][kVecsPerLane];
        int64_t batch[kUnroll], first[kUnroll];  // the unit's batch and first vector within it
        int valid[kUnroll];                       // the unit's vectors before the batch's end
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
            const int64_t u = u0 + k;
            batch[k] = (u >= p.units || p.units == p.units_per_batch) ? 0 : u / p.units_per_batch;
            first[k] = (u - batch[k] * p.units_per_batch) * kUnitVecs;
            valid[k] = u < p.units ? int(min(int64_t(kUnitVecs), p.vecs - first[k])) : 0;
            const uint4* x = p.x + batch[k] * p.x_sb + first[k];
            const uint4* res = p.residual + batch[k] * p.r_sb + first[k];
#pragma unroll
            for (int i = 0; i < kVecsPerLane; ++i) {
                const int w = i * kLanes + lane;
                v[k][i] = w < valid[k] ? load(x + w) : make_uint4(0, 0, 0, 0);
                if constexpr (kResidual) r[k][i] = w < valid[k] ? load(res + w) : make_uint4(0, 0, 0, 0);
            }
        }
        // y = x + bias (+ residual, rounded as its own pass would store it: then kept packed in v)
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
#pragma unroll
            for (int i = 0; i < kVecsPerLane; ++i) {
                const int w = i * kLanes + lane;
                float f[8];
                unpack<T>(v[k][i], f);
                if constexpr (kBias) add_channels(f, bias_s + cb[i]);
                if constexpr (kResidual) {
                    float g[8];
                    unpack<T>(r[k][i], g);
#pragma unroll
                    for (int e = 0; e < 8; ++e) f[e] += g[e];
                    v[k][i] = pack<T>(f);
                    unpack<T>(v[k][i], f);
                    if constexpr (kSum) {
                        if (w < valid[k]) p.sum[batch[k] * p.z_sb + first[k] + w] = v[k][i];
                    }
                }
                float ss = 0.f;
#pragma unroll
                for (int e = 0; e < 8; ++e) ss = fmaf(f[e], f[e], ss);
                parts[warp][k][w] = ss;
            }
        }
        __syncwarp();
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
            // lane l adds vectors 3l..3l+2 (one position's: vp is a multiple of 3), then the position's lanes
            // (an aligned group of vp / 3, a power of 2) add theirs
            const float* q = &parts[warp][k][kVecsPerLane * lane];
            float t = q[0] + q[1] + q[2];
            for (int o = 1; o < p.group; o <<= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
            const float inv_lane = 1.f / fmaxf(sqrtf(t), p.eps);
            uint4* out = p.out + batch[k] * p.o_sb + first[k];
#pragma unroll
            for (int i = 0; i < kVecsPerLane; ++i) {
                const int w = i * kLanes + lane;
                const float inv = __shfl_sync(0xffffffffu, inv_lane, pos[i] * p.group);
                float f[8], g[8];
                unpack<T>(v[k][i], f);
                if constexpr (kBias && !kResidual) add_channels(f, bias_s + cb[i]);
                channels(g, gamma_s + cb[i]);
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    float y = f[e] * inv * g[e];
                    if constexpr (kSilu) y = __fdividef(y, 1.f + __expf(-y));
                    f[e] = y;
                }
                if (w >= valid[k]) continue;
                const uint4 o = pack<T>(f);
                out[w] = o;
                if constexpr (kTail) {
                    const int64_t j = first[k] + w - p.tail_start * p.vp;
                    if (j >= 0) p.tail[batch[k] * p.t_sb + j] = o;
                }
            }
        }
        __syncwarp();  // parts are rewritten by the next units
    }
}

template <typename T, bool kBias, bool kResidual, bool kSum, bool kTail>
cudaError_t launch_silu(const NormParams& p, bool silu, int blocks, cudaStream_t stream) {
    if (silu) {
        norm_silu_kernel<T, kBias, kResidual, kSum, kTail, true><<<blocks, kWarps * kLanes, 0, stream>>>(p);
    } else {
        norm_silu_kernel<T, kBias, kResidual, kSum, kTail, false><<<blocks, kWarps * kLanes, 0, stream>>>(p);
    }
    return cudaGetLastError();
}

template <typename T, bool kBias, bool kResidual, bool kSum>
cudaError_t launch_tail(const NormParams& p, bool tail, bool silu, int blocks, cudaStream_t stream) {
    return tail ? launch_silu<T, kBias, kResidual, kSum, true>(p, silu, blocks, stream)
                : launch_silu<T, kBias, kResidual, kSum, false>(p, silu, blocks, stream);
}

template <typename T>
cudaError_t launch(const NormParams& p, const NormCall& c, int blocks, cudaStream_t stream) {
    const bool tail = c.tail != nullptr, silu = c.silu;
    if (c.residual != nullptr) {
        if (c.sum != nullptr)
            return c.bias ? launch_tail<T, true, true, true>(p, tail, silu, blocks, stream)
                          : launch_tail<T, false, true, true>(p, tail, silu, blocks, stream);
        return c.bias ? launch_tail<T, true, true, false>(p, tail, silu, blocks, stream)
                      : launch_tail<T, false, true, false>(p, tail, silu, blocks, stream);
    }
    return c.bias ? launch_tail<T, true, false, false>(p, tail, silu, blocks, stream)
                  : launch_tail<T, false, false, false>(p, tail, silu, blocks, stream);
}

bool aligned16(const void* ptr, int64_t batch_stride) {
    return ptr == nullptr || (reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && batch_stride % 8 == 0);
}

}  // namespace

bool norm_takes_channels(int channels) {
    if (channels < 24 || channels % 24 != 0) return false;
    const int group = channels / 24;  // lanes per position: a power of 2 up to a warp
    return group <= kLanes && (group & (group - 1)) == 0;
}

cudaError_t norm_silu(const NormCall& c, cudaStream_t stream) {
    if (!norm_takes_channels(c.C) || c.B < 1 || c.positions < 0 || (c.sum != nullptr && c.residual == nullptr) ||
        c.tail_start < 0 || c.tail_start > c.positions)
        return cudaErrorInvalidValue;
    if (!aligned16(c.x, c.x_sb) || !aligned16(c.out, c.o_sb) || !aligned16(c.residual, c.r_sb) ||
        !aligned16(c.sum, c.z_sb) || !aligned16(c.tail, c.t_sb))
        return cudaErrorInvalidValue;
    if (c.positions == 0) return cudaSuccess;
    NormParams p;
    p.x = static_cast<const uint4*>(c.x);
    p.out = static_cast<uint4*>(c.out);
    p.residual = static_cast<const uint4*>(c.residual);
    p.sum = static_cast<uint4*>(c.sum);
    p.tail = static_cast<uint4*>(c.tail);
    p.gamma = c.gamma;
    p.bias = c.bias;
    p.x_sb = c.x_sb / 8; p.o_sb = c.o_sb / 8; p.r_sb = c.r_sb / 8; p.z_sb = c.z_sb / 8; p.t_sb = c.t_sb / 8;
    p.C = c.C;
    p.vp = c.C / 8;
    p.group = p.vp / 3;
    p.vecs = c.positions * p.vp;
    p.units_per_batch = (p.vecs + kUnitVecs - 1) / kUnitVecs;
    p.units = p.units_per_batch * c.B;
    p.tail_start = c.tail_start;
    p.eps = c.eps;
    int device = 0, sms = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) return err;
    // enough warps to keep each SM's loads in flight (8 blocks of 8 warps an SM), each looping over its units
    const int64_t wanted = (p.units + kWarps * kUnroll - 1) / (kWarps * kUnroll);
    const int blocks = int(wanted < int64_t(sms) * 8 ? wanted : int64_t(sms) * 8);
    return c.half ? launch<__half>(p, c, blocks, stream) : launch<__nv_bfloat16>(p, c, blocks, stream);
}

}  // namespace oasis_vae
