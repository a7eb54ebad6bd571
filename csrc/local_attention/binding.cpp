// The local-attention kernels as torch operators: torch.ops.oasis_local.forward / .backward.
// Both write into tensors the caller allocated (the routed layer's outputs, a head slice each),
// so they return nothing. Python registers their fake implementations
// (oasis_kernels/kernels/cuda_local.py); the routed layer's autograd calls them.
// The Python backend (oasis_kernels/backends/cuda_local.py) declines what these checks refuse,
// with its reasons; the checks keep a direct call from reading out of bounds. The head table
// stays on the device (checking it here would wait for the GPU): the kernels skip an entry
// outside [0, heads) instead.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "local_attention.h"

namespace {

using oasis_local::DType;
using oasis_local::Layer;
using oasis_local::View;

void check_rows(const at::Tensor& x, const at::Tensor& q, const char* name) {
    TORCH_CHECK(x.dim() == 4, "oasis_local: ", name, " must be [B, N, heads, D], got ", x.sizes());
    TORCH_CHECK(x.sizes() == q.sizes(), "oasis_local: ", name, " has shape ", x.sizes(), ", q has ", q.sizes());
    TORCH_CHECK(x.scalar_type() == q.scalar_type(), "oasis_local: ", name, " is ", x.scalar_type(), ", q is ",
                q.scalar_type());
    TORCH_CHECK(x.device() == q.device(), "oasis_local: ", name, " is on ", x.device(), ", q on ", q.device());
    TORCH_CHECK(x.stride(3) == 1, "oasis_local: ", name, " needs unit stride on the head dim, got ", x.strides());
    // 16-byte rows for cp.async; a dimension of size 1 is never stepped along
    bool aligned = reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
    for (int d = 0; d < 3; ++d) aligned = aligned && (x.size(d) == 1 || x.stride(d) % 8 == 0);
    TORCH_CHECK(aligned, "oasis_local: ", name, " needs 16-byte aligned rows (data pointer and strides), got strides ",
                x.strides());
}

View view_of(const at::Tensor& x) { return View{x.data_ptr(), x.stride(0), x.stride(1), x.stride(2)}; }

DType dtype_of(const at::Tensor& q) {
    TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
                "oasis_local: supports float16 and bfloat16, got ", q.scalar_type());
    return q.scalar_type() == at::kBFloat16 ? DType::kBFloat16 : DType::kFloat16;
}

Layer layer_of(const at::Tensor& q, const at::Tensor& lse, const at::Tensor& heads, int64_t n_window,
               at::IntArrayRef grid, at::IntArrayRef radii) {
    TORCH_CHECK(q.is_cuda(), "oasis_local: needs CUDA tensors, got q on ", q.device());
    TORCH_CHECK(q.size(3) == 64 || q.size(3) == 128, "oasis_local: head dim 64 or 128, got ", q.size(3));
    TORCH_CHECK(grid.size() == 3 && radii.size() == 3, "oasis_local: grid and radii are (t, h, w)");
    for (int a = 0; a < 3; ++a)  // before the product, which could wrap around
        TORCH_CHECK(grid[a] >= 1 && grid[a] < (int64_t(1) << 31), "oasis_local: grid ", grid, " out of range");
    TORCH_CHECK(grid[0] * grid[1] * grid[2] == q.size(1), "oasis_local: grid ", grid, " has ",
                grid[0] * grid[1] * grid[2], " tokens, q has ", q.size(1));
    for (int a = 0; a < 3; ++a)
        TORCH_CHECK(radii[a] >= 0 && radii[a] < grid[a], "oasis_local: radii ", radii, " must be clipped to grid ",
                    grid);
    TORCH_CHECK(q.size(1) < (int64_t(1) << 31), "oasis_local: at most 2^31 - 1 tokens, got ", q.size(1));
    TORCH_CHECK(heads.is_cuda() && heads.device() == q.device() && heads.scalar_type() == at::kInt &&
                    heads.dim() == 1 && heads.is_contiguous(),
                "oasis_local: heads must be a contiguous int32 tensor on q's device");
    TORCH_CHECK(n_window >= 0 && n_window <= heads.numel(), "oasis_local: n_window ", n_window, " of ",
                heads.numel(), " heads");
    TORCH_CHECK(q.size(0) * heads.numel() <= 65535, "oasis_local: batch x local heads is at most 65535 (the grid's y "
                "dimension), got ", q.size(0), " x ", heads.numel());
    TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == q.size(0) &&
                    lse.size(1) == q.size(2) && lse.size(2) == q.size(1) && lse.stride(2) == 1 &&
                    lse.device() == q.device(),
                "oasis_local: lse must be float32 [B, heads, N] with unit token stride on q's device, got ",
                lse.scalar_type(), " ", lse.sizes(), " strides ", lse.strides());
    return Layer{int(q.size(0)), int(grid[0]), int(grid[1]), int(grid[2]), int(q.size(3)), int(radii[0]),
                 int(radii[1]), int(radii[2]), heads.data_ptr<int>(), int(heads.numel()), int(n_window), int(q.size(2))};
}

void check_launch(cudaError_t err) {
    TORCH_CHECK(err == cudaSuccess, "oasis_local: kernel launch failed: ", cudaGetErrorString(err));
}

void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
             const at::Tensor& lse, const at::Tensor& heads, int64_t n_window, at::IntArrayRef grid,
             at::IntArrayRef radii, double scale) {
    const DType dtype = dtype_of(q);
    check_rows(q, q, "q");
    check_rows(k, q, "k");
    check_rows(v, q, "v");
    check_rows(out, q, "out");
    c10::cuda::CUDAGuard guard(q.device());
    oasis_local::ForwardParams p{layer_of(q, lse, heads, n_window, grid, radii),
                                view_of(q), view_of(k), view_of(v), view_of(out),
                                lse.data_ptr<float>(), lse.stride(0), lse.stride(1), float(scale)};
    check_launch(oasis_local::forward(p, dtype, c10::cuda::getCurrentCUDAStream(q.device().index()).stream()));
}

void backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dq, const at::Tensor& dk,
              const at::Tensor& dv, const at::Tensor& heads, int64_t n_window, at::IntArrayRef grid,
              at::IntArrayRef radii, double scale) {
    const DType dtype = dtype_of(q);
    check_rows(q, q, "q");
    const char* names[] = {"dout", "k", "v", "out", "dq", "dk", "dv"};
    const at::Tensor* tensors[] = {&dout, &k, &v, &out, &dq, &dk, &dv};
    for (int i = 0; i < 7; ++i) check_rows(*tensors[i], q, names[i]);
    c10::cuda::CUDAGuard guard(q.device());
    const Layer layer = layer_of(q, lse, heads, n_window, grid, radii);
    at::Tensor delta = at::empty({q.size(0), heads.numel(), q.size(1)}, q.options().dtype(at::kFloat));
    oasis_local::BackwardParams p{layer, view_of(q), view_of(k), view_of(v), view_of(out), view_of(dout),
                                  view_of(dq), view_of(dk), view_of(dv), lse.data_ptr<float>(), lse.stride(0),
                                  lse.stride(1), delta.data_ptr<float>(), float(scale)};
    check_launch(oasis_local::backward(p, dtype, c10::cuda::getCurrentCUDAStream(q.device().index()).stream()));
}

}  // namespace

TORCH_LIBRARY(oasis_local, m) {
    m.def("forward(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor(b!) lse, Tensor heads, int n_window, "
          "int[] grid, int[] radii, float scale) -> ()");
    m.def("backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor(a!) dq, "
          "Tensor(b!) dk, Tensor(c!) dv, Tensor heads, int n_window, int[] grid, int[] radii, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(oasis_local, CUDA, m) {
    m.impl("forward", &forward);
    m.impl("backward", &backward);
}
