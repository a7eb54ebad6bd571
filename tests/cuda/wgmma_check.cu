// The wgmma building blocks of csrc/hopper/wgmma.cuh against a CPU matmul, on an sm_90 GPU:
//   ss64:  C = A B^T, A and B 64 x 64 K-major in shared memory (S = Q K^T at D = 64)
//   ss128: the same with K = 128 (two 64-element panels per row: D = 128)
//   rs:    C = P V, P 64 x 64 from registers (mma.sync's A fragments), V 64 keys x 64 N-major (O += P V)
//   rs128: the same with V 64 x 128, two accumulators on its two panels (O at D = 128)
// each in bf16 and fp16 (the bf16 forms passed on an H200 at 426bad8, with the N-major descriptor
// read as here). Prints one line per case and exits 1 if one fails; without an sm_90 GPU it says so
// and exits 0 (CI compiles it only).
//   nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a -I csrc/local_attention
//        tests/cuda/wgmma_check.cu -o wgmma_check
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "wgmma.cuh"

#include <cuda_fp16.h>

using bf16 = __nv_bfloat16;
using f16 = __half;

// the 16 bits of an element, and two of them in one register (lo in the low half)
template <typename E>
__host__ __device__ __forceinline__ uint16_t bits(E x) {
    if constexpr (std::is_same_v<E, f16>) return __half_as_ushort(x);
    else return __bfloat16_as_ushort(x);
}
template <typename E>
__device__ __forceinline__ uint32_t pack(E lo, E hi) { return uint32_t(bits(lo)) | (uint32_t(bits(hi)) << 16); }
template <typename E>
static float as_float(E x) {
    if constexpr (std::is_same_v<E, f16>) return __half2float(x);
    else return __bfloat162float(x);
}

// the accumulator of one warpgroup (64 x 64 f32) to columns col0.. of a row-major 64 x ldc matrix
__device__ void store(float* c, const float (&d)[32], int ldc = 64, int col0 = 0) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int j = 0; j < 8; ++j)
        for (int e = 0; e < 4; ++e) {
            const int row = 16 * warp + lane / 4 + (e >= 2 ? 8 : 0), col = 8 * j + 2 * (lane % 4) + (e & 1);
            c[row * ldc + col0 + col] = d[4 * j + e];
        }
}

// C[64][64] = A[64][K] B[64][K]^T
template <typename E, int K>
__global__ void ss_kernel(const E* a, const E* b, float* c) {
    __shared__ alignas(1024) E sa[64 * K];
    __shared__ alignas(1024) E sb[64 * K];
    for (int i = threadIdx.x; i < 64 * K; i += blockDim.x) {
        sa[wgmma::swizzled(i / K, i % K, 64)] = a[i];
        sb[wgmma::swizzled(i / K, i % K, 64)] = b[i];
    }
    wgmma::fence_smem_for_async();
    __syncthreads();
    float d[32];
    for (int i = 0; i < 32; ++i) d[i] = 0.f;
    wgmma::fence();
    for (int ks = 0; ks < K / 16; ++ks)
        wgmma::mma_ss<std::is_same_v<E, f16>>(d, wgmma::k_major(sa, ks, 64), wgmma::k_major(sb, ks, 64), ks > 0);
    wgmma::commit();
    wgmma::wait<0>();
    store(c, d);
}

// C[64][N] = P[64][64] V[64][N], N = 64 or 128 (two accumulators on V's two 64-column panels, as the
// forward's O += P V at D = 128)
template <typename E, int N>
__global__ void rs_kernel(const E* p, const E* v, float* c) {
    __shared__ alignas(1024) E sv[64 * N];
    for (int i = threadIdx.x; i < 64 * N; i += blockDim.x) sv[wgmma::swizzled(i / N, i % N, 64)] = v[i];
    wgmma::fence_smem_for_async();
    __syncthreads();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int r0 = 16 * warp + lane / 4, q = 2 * (lane % 4);
    float d[N / 64][32];
    for (int n = 0; n < N / 64; ++n)
        for (int i = 0; i < 32; ++i) d[n][i] = 0.f;
    uint32_t frag[4][4];
    for (int ks = 0; ks < 4; ++ks) {
        const int k0 = 16 * ks + q;
        frag[ks][0] = pack(p[r0 * 64 + k0], p[r0 * 64 + k0 + 1]);
        frag[ks][1] = pack(p[(r0 + 8) * 64 + k0], p[(r0 + 8) * 64 + k0 + 1]);
        frag[ks][2] = pack(p[r0 * 64 + k0 + 8], p[r0 * 64 + k0 + 9]);
        frag[ks][3] = pack(p[(r0 + 8) * 64 + k0 + 8], p[(r0 + 8) * 64 + k0 + 9]);
    }
    wgmma::fence();
    for (int ks = 0; ks < 4; ++ks)
        for (int n = 0; n < N / 64; ++n)
            wgmma::mma_rs<std::is_same_v<E, f16>>(d[n], frag[ks], wgmma::n_major(sv + n * 64 * 64, ks, 64), ks > 0);
    wgmma::commit();
    wgmma::wait<0>();
    for (int n = 0; n < N / 64; ++n) store(c, d[n], N, 64 * n);
}

template <typename E>
static std::vector<E> random_values(int n, unsigned seed) {
    std::vector<E> x(n);
    srand(seed);
    for (auto& e : x) e = E(float(rand()) / RAND_MAX * 2.f - 1.f);
    return x;
}

// the worst |C - reference| of C (64 x n) = X Y^T (X 64 x K, y n x K) or C = X Y (y K x n)
template <typename E>
static double worst(const std::vector<float>& c, const std::vector<E>& x, const std::vector<E>& y, int k,
                    bool y_transposed, int n) {
    double err = 0;
    for (int i = 0; i < 64; ++i)
        for (int j = 0; j < n; ++j) {
            double ref = 0;
            for (int t = 0; t < k; ++t)
                ref += double(as_float(x[i * k + t])) * double(as_float(y_transposed ? y[j * k + t] : y[t * n + j]));
            err = fmax(err, fabs(ref - c[i * n + j]));
        }
    return err;
}

template <typename E, typename Launch>
static double run(Launch launch, const std::vector<E>& x, const std::vector<E>& y, int k, bool y_transposed,
                  int n = 64) {
    E *dx, *dy;
    float* dc;
    cudaMalloc(&dx, x.size() * sizeof(E));
    cudaMalloc(&dy, y.size() * sizeof(E));
    cudaMalloc(&dc, 64 * n * sizeof(float));
    cudaMemcpy(dx, x.data(), x.size() * sizeof(E), cudaMemcpyHostToDevice);
    cudaMemcpy(dy, y.data(), y.size() * sizeof(E), cudaMemcpyHostToDevice);
    cudaMemset(dc, 0xff, 64 * n * sizeof(float));  // NaN where nothing is written
    launch(dx, dy, dc);
    const cudaError_t status = cudaDeviceSynchronize();
    std::vector<float> c(64 * n);
    cudaMemcpy(c.data(), dc, c.size() * sizeof(float), cudaMemcpyDeviceToHost);
    cudaFree(dx);
    cudaFree(dy);
    cudaFree(dc);
    if (status != cudaSuccess) {
        printf("  CUDA error: %s\n", cudaGetErrorString(status));
        return INFINITY;
    }
    const double e = worst(c, x, y, k, y_transposed, n);
    return std::isnan(e) ? INFINITY : e;
}

// the three forms for one element type; prints a line per case, returns whether all passed
template <typename E>
static bool check(const char* type, unsigned seed) {
    const double tol = 1e-3;  // float32 sums of 64-128 products of 16-bit values in [-1, 1]
    bool ok = true;
    auto report = [&](const char* name, double err) {
        const bool pass = err <= tol;
        printf("%-5s %-6s max |err| %.3e  %s\n", type, name, err, pass ? "PASS" : "FAIL");
        ok = ok && pass;
    };
    {
        auto a = random_values<E>(64 * 64, seed), b = random_values<E>(64 * 64, seed + 1);
        report("ss64", run([](E* x, E* y, float* c) { ss_kernel<E, 64><<<1, 128>>>(x, y, c); }, a, b, 64, true));
    }
    {
        auto a = random_values<E>(64 * 128, seed + 2), b = random_values<E>(64 * 128, seed + 3);
        report("ss128", run([](E* x, E* y, float* c) { ss_kernel<E, 128><<<1, 128>>>(x, y, c); }, a, b, 128, true));
    }
    {
        auto p = random_values<E>(64 * 64, seed + 4), v = random_values<E>(64 * 64, seed + 5);
        report("rs", run([](E* x, E* y, float* c) { rs_kernel<E, 64><<<1, 128>>>(x, y, c); }, p, v, 64, false));
    }
    {
        auto p = random_values<E>(64 * 64, seed + 6), v = random_values<E>(64 * 128, seed + 7);
        report("rs128",
               run([](E* x, E* y, float* c) { rs_kernel<E, 128><<<1, 128>>>(x, y, c); }, p, v, 64, false, 128));
    }
    return ok;
}

int main() {
    int dev = 0, major = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) ||
        major != 9) {
        printf("wgmma_check: no sm_90 GPU here; nothing run\n");
        return 0;
    }
    const bool ok_bf16 = check<bf16>("bf16", 1);
    const bool ok_f16 = check<f16>("fp16", 11);
    return ok_bf16 && ok_f16 ? 0 : 1;
}
