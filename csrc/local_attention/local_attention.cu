// Host launchers of the local-attention kernels (the forward: forward_wgmma.cuh; the backward:
// backward_wgmma.cuh, its delta kernels.cuh): tile shapes, grids, shared memory.
#include "backward_wgmma.cuh"
#include "forward_wgmma.cuh"
#include "kernels.cuh"
#include "local_attention.h"

namespace oasis_local {

namespace {

using detail::kRows;
using detail::kThreads;
using detail::kTileT;

// every kernel walks 64 positions per block: one m64n64 score tile of a warpgroup
constexpr int kBlockN = 64;

int cdiv(int a, int b) { return (a + b - 1) / b; }

int window_tiles(const Layer& L, TileShape s) {
    return cdiv(L.T, kTileT) * cdiv(L.H, s.bh) * cdiv(L.W, s.bw);
}

int intra_tiles(const Layer& L) { return L.T * cdiv(L.H * L.W, kRows); }

dim3 grid_of(const Layer& L, TileShape s) {
    int x = 0;
    if (L.n_window > 0) x = window_tiles(L, s);
    if (L.n_local > L.n_window) x = x > intra_tiles(L) ? x : intra_tiles(L);
    return dim3(x, L.B * L.n_local);
}

template <typename Kernel, typename Params>
cudaError_t launch(Kernel kernel, dim3 grid, size_t smem, cudaStream_t stream, const Params& params, TileShape s) {
    if (grid.x == 0 || grid.y == 0) return cudaSuccess;
    if (smem > 48 * 1024) {
        cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
        if (err != cudaSuccess) return err;
    }
    kernel<<<grid, kThreads, smem, stream>>>(params, s.bh, s.bw);
    return cudaGetLastError();
}

template <typename T, int D>
cudaError_t forward_typed(const ForwardParams& p, cudaStream_t stream) {
    const Layer& L = p.layer;
    const TileShape s = window_tile(L.H, L.W, L.rh, L.rw, kBlockN);
    const size_t smem = size_t(kRows + 4 * kBlockN) * D * sizeof(T);
    // (+1024: the kernel aligns its tiles to 1024 bytes, wgmma's swizzle atom)
    return launch(detail::forward_wgmma_kernel<T, D, kBlockN>, grid_of(L, s), smem + 1024, stream, p, s);
}

template <typename T, int D>
cudaError_t backward_typed(const BackwardParams& p, cudaStream_t stream) {
    const Layer& L = p.layer;
    const int N = L.T * L.H * L.W;
    if (N > 0 && L.B * L.n_local > 0) {
        detail::delta_kernel<T, D><<<dim3(cdiv(N, 8), L.B * L.n_local), 256, 0, stream>>>(p);
        cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return err;
    }
    const TileShape s = window_tile(L.H, L.W, L.rh, L.rw, kBlockN);
    // Q, dO and two stages of K and V; K, V and two stages of Q, dO and of the queries' LSE and delta
    // (+1024: the kernels align their tiles to 1024 bytes, wgmma's swizzle atom)
    const size_t smem_q = size_t(2 * kRows + 4 * kBlockN) * D * sizeof(T) + 1024;
    cudaError_t err = launch(detail::dq_wgmma_kernel<T, D, kBlockN>, grid_of(L, s), smem_q, stream, p, s);
    if (err != cudaSuccess) return err;
    const size_t smem_k = smem_q + 4 * kBlockN * sizeof(float);
    return launch(detail::dkdv_wgmma_kernel<T, D, kBlockN>, grid_of(L, s), smem_k, stream, p, s);
}

}  // namespace

TileShape window_tile(int H, int W, int rh, int rw, int block_n) {
    // the warp's 16 rows as bh x bw: the fewest (tile, halo block) steps over the frame
    TileShape best = detail::kTileShapes[0];
    long best_cost = -1;
    for (TileShape s : detail::kTileShapes) {
        const long cost = long(cdiv(H, s.bh)) * cdiv(W, s.bw) * cdiv((s.bh + 2 * rh) * (s.bw + 2 * rw), block_n);
        if (best_cost < 0 || cost < best_cost) {
            best = s;
            best_cost = cost;
        }
    }
    return best;
}

cudaError_t forward(const ForwardParams& p, DType dtype, cudaStream_t stream) {
    const int D = p.layer.D;
    if (dtype == DType::kBFloat16 && D == 64) return forward_typed<__nv_bfloat16, 64>(p, stream);
    if (dtype == DType::kBFloat16 && D == 128) return forward_typed<__nv_bfloat16, 128>(p, stream);
    if (dtype == DType::kFloat16 && D == 64) return forward_typed<__half, 64>(p, stream);
    if (dtype == DType::kFloat16 && D == 128) return forward_typed<__half, 128>(p, stream);
    return cudaErrorInvalidValue;
}

cudaError_t backward(const BackwardParams& p, DType dtype, cudaStream_t stream) {
    const int D = p.layer.D;
    if (dtype == DType::kBFloat16 && D == 64) return backward_typed<__nv_bfloat16, 64>(p, stream);
    if (dtype == DType::kBFloat16 && D == 128) return backward_typed<__nv_bfloat16, 128>(p, stream);
    if (dtype == DType::kFloat16 && D == 64) return backward_typed<__half, 64>(p, stream);
    if (dtype == DType::kFloat16 && D == 128) return backward_typed<__half, 128>(p, stream);
    return cudaErrorInvalidValue;
}

}  // namespace oasis_local
