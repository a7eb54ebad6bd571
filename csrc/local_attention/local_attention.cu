// Host launchers of the local-attention kernels (the forward: forward_wgmma.cuh; the backward:
// backward_wgmma.cuh, its delta kernels.cuh; the TMA forwards: forward_tma.cuh): tile shapes, grids, shared memory.
#include <cudaTypedefs.h>

#include "backward_wgmma.cuh"
#include "forward_tma.cuh"
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
cudaError_t forward_wgmma(const ForwardParams& p, cudaStream_t stream) {
    const Layer& L = p.layer;
    const TileShape s = window_tile(L.H, L.W, L.rh, L.rw, kBlockN);
    const size_t smem = size_t(kRows + 4 * kBlockN) * D * sizeof(T);
    // (+1024: the kernel aligns its tiles to 1024 bytes, wgmma's swizzle atom)
    return launch(detail::forward_wgmma_kernel<T, D, kBlockN>, grid_of(L, s), smem + 1024, stream, p, s);
}

using hopper::tensor_map_encoder;

// a [B, N, heads, D] view as the 5-D tensor map (D, H*W, T, heads, B) of 64 x 64 boxes in wgmma's
// 128-byte swizzle (a frame's end a tensor edge: zeros past it); false where TMA cannot address it
// (alignment, strides not multiples of 16 bytes)
template <typename T>
bool tensor_map(CUtensorMap* map, const View& v, const Layer& L) {
    const auto encode = tensor_map_encoder();
    const int64_t hw = int64_t(L.H) * L.W;
    const int64_t strides_el[4] = {v.sn, v.sn * hw, v.sh, v.sb};
    if (encode == nullptr || reinterpret_cast<uintptr_t>(v.ptr) % 16 != 0) return false;
    for (int64_t st : strides_el)
        if (st <= 0 || (st * int64_t(sizeof(T))) % 16 != 0 || st * int64_t(sizeof(T)) >= (int64_t(1) << 40)) return false;
    const cuuint64_t dims[5] = {cuuint64_t(L.D), cuuint64_t(hw), cuuint64_t(L.T), cuuint64_t(L.n_heads),
                                cuuint64_t(L.B)};
    cuuint64_t strides[4];
    for (int i = 0; i < 4; ++i) strides[i] = cuuint64_t(strides_el[i] * int64_t(sizeof(T)));
    const cuuint32_t box[5] = {64, 64, 1, 1, 1}, unit[5] = {1, 1, 1, 1, 1};
    const CUtensorMapDataType type =
        std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
    return encode(map, type, 5, const_cast<void*>(v.ptr), dims, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
                  CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// a [B, N, heads, D] view whose batches follow each other in time (sb = N sn) as the 5-D tensor map
// (D, W, H, T * B, heads) of boxes of 64 x box_w x box_h (a window tile's tokens, or its halo slice)
template <typename T>
bool window_tensor_map(CUtensorMap* map, const View& v, const Layer& L, int box_w, int box_h) {
    const auto encode = tensor_map_encoder();
    const int64_t hw = int64_t(L.H) * L.W;
    const int64_t strides_el[4] = {v.sn, v.sn * L.W, v.sn * hw, v.sh};
    if (encode == nullptr || reinterpret_cast<uintptr_t>(v.ptr) % 16 != 0 || (L.B > 1 && v.sb != v.sn * hw * L.T) ||
        box_w > 256 || box_h > 256)
        return false;
    for (int64_t st : strides_el)
        if (st <= 0 || (st * int64_t(sizeof(T))) % 16 != 0 || st * int64_t(sizeof(T)) >= (int64_t(1) << 40)) return false;
    const cuuint64_t dims[5] = {cuuint64_t(L.D), cuuint64_t(L.W), cuuint64_t(L.H), cuuint64_t(L.T) * L.B,
                                cuuint64_t(L.n_heads)};
    cuuint64_t strides[4];
    for (int i = 0; i < 4; ++i) strides[i] = cuuint64_t(strides_el[i] * int64_t(sizeof(T)));
    const cuuint32_t box[5] = {64, cuuint32_t(box_w), cuuint32_t(box_h), 1, 1}, unit[5] = {1, 1, 1, 1, 1};
    const CUtensorMapDataType type =
        std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
    return encode(map, type, 5, const_cast<void*>(v.ptr), dims, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
                  CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// the window heads' TMA programs: one window tile (one consumer warpgroup) and two K/V stages each, so that
// two programs share an SM (forward_tma.cuh)
constexpr int kWindowStages = 2;

// the window heads by TMA (forward_tma.cuh) where a halo slice is one box of at most 64 positions;
// false (nothing launched) otherwise, for the wgmma kernel
template <typename T, int D>
bool forward_window_tma(const ForwardParams& p, cudaStream_t stream, cudaError_t* err) {
    const Layer& L = p.layer;
    if (L.n_window == 0) return false;
    const TileShape t = window_tile(L.H, L.W, L.rh, L.rw, kBlockN);
    const int sw = t.bw + 2 * L.rw, sh = t.bh + 2 * L.rh;
    TmaMaps maps;
    if (sw * sh > kBlockN || !window_tensor_map<T>(&maps.q, p.q, L, t.bw, t.bh) ||
        !window_tensor_map<T>(&maps.k, p.k, L, sw, sh) || !window_tensor_map<T>(&maps.v, p.v, L, sw, sh))
        return false;
    ForwardParams window = p;
    window.layer.n_local = L.n_window;
    constexpr int S = kWindowStages;
    const dim3 grid(cdiv(L.T, kTileT) * cdiv(L.H, t.bh) * cdiv(L.W, t.bw), L.B * L.n_window);
    *err = cudaSuccess;
    if (grid.x == 0 || grid.y == 0) return true;
    const auto kernel = detail::forward_tma_window_kernel<T, D, S>;
    constexpr size_t smem = detail::tma_smem<T, D, 1, S, true>();
    *err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (*err == cudaSuccess) {
        kernel<<<grid, 128 + 32, smem, stream>>>(maps, window, t.bh, t.bw);
        *err = cudaGetLastError();
    }
    return true;
}

// the intra heads by TMA and two consumer warpgroups (forward_tma.cuh); false (nothing launched) where
// the tensors do not suit TMA, so the caller runs them on the wgmma kernel
template <typename T, int D>
bool forward_intra_tma(const ForwardParams& p, cudaStream_t stream, cudaError_t* err) {
    const Layer& L = p.layer;
    TmaMaps maps;
    if (L.n_local <= L.n_window || !tensor_map<T>(&maps.q, p.q, L) || !tensor_map<T>(&maps.k, p.k, L) ||
        !tensor_map<T>(&maps.v, p.v, L))
        return false;
    ForwardParams intra = p;
    intra.layer.heads = L.heads + L.n_window;
    intra.layer.n_local = L.n_local - L.n_window;
    intra.layer.n_window = 0;
    const dim3 grid(L.T * cdiv(L.H * L.W, detail::tma::kRowsTma), L.B * intra.layer.n_local);
    *err = cudaSuccess;
    if (grid.x == 0 || grid.y == 0) return true;
    const auto kernel = detail::forward_tma_intra_kernel<T, D>;
    constexpr size_t smem = detail::tma_smem<T, D, detail::tma::kConsumers, detail::tma::kStages, true>();
    *err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (*err == cudaSuccess) {
        kernel<<<grid, detail::tma::kThreadsTma, smem, stream>>>(maps, intra);
        *err = cudaGetLastError();
    }
    return true;
}

// Each mode on its TMA kernel where the tensors and the window suit it, the rest on the wgmma kernel (one
// launch for whatever is left: both modes, or one)
template <typename T, int D>
cudaError_t forward_typed(const ForwardParams& p, cudaStream_t stream) {
    cudaError_t err = cudaSuccess;
    const bool window_done = forward_window_tma<T, D>(p, stream, &err);
    if (err != cudaSuccess) return err;
    const bool intra_done = forward_intra_tma<T, D>(p, stream, &err);
    if (err != cudaSuccess || (window_done && (intra_done || p.layer.n_local == p.layer.n_window))) return err;
    ForwardParams rest = p;
    if (window_done) {  // the intra heads
        rest.layer.heads = p.layer.heads + p.layer.n_window;
        rest.layer.n_local = p.layer.n_local - p.layer.n_window;
        rest.layer.n_window = 0;
    } else if (intra_done || p.layer.n_local == p.layer.n_window) {  // the window heads
        rest.layer.n_local = p.layer.n_window;
    }
    return forward_wgmma<T, D>(rest, stream);
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
