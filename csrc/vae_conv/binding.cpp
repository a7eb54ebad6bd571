// The VAE's CUDA convolutions as torch operators: torch.ops.oasis_vae.conv3d_k3 and conv3d_few_out. Each writes into
// the output the caller allocated and returns nothing; oasis/vae_cuda.py registers its fake
// implementation, packs the weight and decides which calls come here (its `usable` says why not).
// These checks keep a direct call from reading or writing out of bounds.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "vae_conv.h"

namespace {

using oasis_vae::Conv5d;

// a channels-last bf16 [B, C, frames, H, W] on x's device: its strides, 4-byte aligned pairs of channels
Conv5d frames_of(const at::Tensor& t, const at::Tensor& x, int64_t channels, int64_t frames, const char* name) {
    TORCH_CHECK(t.dim() == 5 && t.size(0) == x.size(0) && t.size(1) == channels && t.size(2) == frames &&
                    t.size(3) == x.size(3) && t.size(4) == x.size(4),
                "oasis_vae: ", name, " must be [", x.size(0), ", ", channels, ", ", frames, ", ", x.size(3), ", ",
                x.size(4), "], got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kBFloat16, "oasis_vae: ", name, " must be bfloat16, got ", t.scalar_type());
    TORCH_CHECK(t.device() == x.device(), "oasis_vae: ", name, " is on ", t.device(), ", x on ", x.device());
    TORCH_CHECK(t.stride(1) == 1 || t.size(1) == 1, "oasis_vae: ", name,
                " must be channels-last (unit channel stride), got strides ", t.strides());
    bool even = reinterpret_cast<uintptr_t>(t.data_ptr()) % 4 == 0;
    for (int d : {0, 2, 3, 4}) even = even && (t.size(d) == 1 || t.stride(d) % 2 == 0);
    TORCH_CHECK(even, "oasis_vae: ", name, " needs 4-byte aligned channel pairs, got strides ", t.strides());
    return Conv5d{t.data_ptr(), t.stride(0), t.stride(2), t.stride(3), t.stride(4)};
}

// a contiguous float32 [n] on x's device
const float* per_channel(const at::Tensor& t, const at::Tensor& x, int64_t n, const char* name) {
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n && t.device() == x.device(),
                "oasis_vae: ", name, " must be a contiguous float32 [", n, "] on x's device, got ", t.scalar_type(),
                " ", t.sizes(), " on ", t.device());
    return t.data_ptr<float>();
}

// what both calls take alike: the sizes, x, the cached frames, the packed weight and the bias
template <typename Call>
void fill_inputs(Call& c, const at::Tensor& x, const c10::optional<at::Tensor>& prev, const at::Tensor& weight,
                 const c10::optional<at::Tensor>& bias, int64_t cin, int64_t cout) {
    c.B = int(x.size(0)); c.T = int(x.size(2)); c.H = int(x.size(3)); c.W = int(x.size(4));
    c.cin = int(cin); c.cout = int(cout);
    c.x = frames_of(x, x, cin, x.size(2), "x");
    c.prev = prev.has_value() ? frames_of(*prev, x, cin, 2, "prev") : Conv5d{nullptr, 0, 0, 0, 0};
    c.weight = weight.data_ptr();
    if (bias.has_value()) c.bias = per_channel(*bias, x, cout, "bias");
}

void conv3d_k3(const at::Tensor& x, const c10::optional<at::Tensor>& prev, const at::Tensor& weight,
               const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual,
               const c10::optional<at::Tensor>& norm, const c10::optional<at::Tensor>& tail, const at::Tensor& out) {
    TORCH_CHECK(x.is_cuda() && x.dim() == 5, "oasis_vae: x must be a CUDA [B, C, T, H, W], got ", x.sizes(), " on ",
                x.device());
    const int64_t cin = x.size(1), cout = out.size(1);
    TORCH_CHECK(oasis_vae::conv_takes_cin(int(cin)), "oasis_vae: input channels must be a multiple of 64 in [64, 1024], got ",
                cin);
    TORCH_CHECK(oasis_vae::conv_tile_n(int(cout)) != 0, "oasis_vae: output channels must be a multiple of 96, got ", cout);
    for (int d = 0; d < 5; ++d)
        TORCH_CHECK(x.size(d) < (int64_t(1) << 31), "oasis_vae: x's dims must be < 2^31, got ", x.sizes());
    TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.is_contiguous() && weight.dim() == 2 &&
                    weight.size(0) == cout && weight.size(1) == 27 * cin && weight.device() == x.device(),
                "oasis_vae: weight must be the packed bfloat16 [", cout, ", ", 27 * cin, "] on x's device, got ",
                weight.scalar_type(), " ", weight.sizes());
    oasis_vae::ConvCall c{};
    fill_inputs(c, x, prev, weight, bias, cin, cout);
    if (norm.has_value()) {
        TORCH_CHECK(oasis_vae::conv_tile_n(int(cout)) == cout, "oasis_vae: a norm needs 96 or 192 output channels (one "
                    "program's), got ", cout);
        c.norm = per_channel(*norm, x, cout, "norm");
    }
    if (tail.has_value()) {
        TORCH_CHECK(tail->dim() == 5 && tail->size(2) >= 1 && tail->size(2) <= x.size(2), "oasis_vae: tail must be [",
                    x.size(0), ", ", cout, ", k, ", x.size(3), ", ", x.size(4), "] with 1 <= k <= ", x.size(2), ", got ",
                    tail->sizes());
        c.tail = frames_of(*tail, x, cout, tail->size(2), "tail");
        c.tail_frames = int(tail->size(2));
    }
    c.residual = residual.has_value() ? frames_of(*residual, x, cout, x.size(2), "residual") : Conv5d{nullptr, 0, 0, 0, 0};
    c.out = frames_of(out, x, cout, x.size(2), "out");
    for (const at::Tensor* t : {&out, tail.has_value() ? &*tail : &out})
        for (int d : {0, 2, 3, 4})  // an expanded output would have threads race on one element
            TORCH_CHECK(t->size(d) == 1 || t->stride(d) != 0, "oasis_vae: out and tail must not be expanded, got "
                        "strides ", t->strides());
    c10::cuda::CUDAGuard guard(x.device());
    const cudaError_t err = oasis_vae::conv3d_k3(c, c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
    TORCH_CHECK(err == cudaSuccess, "oasis_vae: conv3d_k3 failed: ", cudaGetErrorString(err),
                err == cudaErrorInvalidValue ? " (a tensor TMA cannot address: 16-byte aligned pointers and strides)" : "");
}

void conv3d_few_out(const at::Tensor& x, const c10::optional<at::Tensor>& prev, const at::Tensor& weight,
                    const c10::optional<at::Tensor>& bias, const at::Tensor& out) {
    TORCH_CHECK(x.is_cuda() && x.dim() == 5, "oasis_vae: x must be a CUDA [B, C, T, H, W], got ", x.sizes(), " on ",
                x.device());
    const int64_t cin = x.size(1), cout = out.dim() == 5 ? out.size(1) : 0;
    TORCH_CHECK(oasis_vae::few_out_takes(int(std::min<int64_t>(cin, 1 << 20)), int(std::min<int64_t>(cout, 1 << 20))),
                "oasis_vae: conv3d_few_out takes input channels a multiple of 16 up to 4096 and 1 to 5 output "
                "channels, got ", cin, " -> ", cout);
    for (int d = 0; d < 5; ++d)
        TORCH_CHECK(x.size(d) < (int64_t(1) << 31), "oasis_vae: x's dims must be < 2^31, got ", x.sizes());
    const int64_t packed = 9 * (cin / 16) * 2 * 32 * 4;
    TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.is_contiguous() && weight.numel() == packed &&
                    weight.device() == x.device() && reinterpret_cast<uintptr_t>(weight.data_ptr()) % 8 == 0,
                "oasis_vae: weight must be the fragment-packed bfloat16 of ", packed, " values on x's device, got ",
                weight.scalar_type(), " ", weight.sizes());
    TORCH_CHECK(out.sizes() == at::IntArrayRef({x.size(0), cout, x.size(2), x.size(3), x.size(4)}) &&
                    out.scalar_type() == at::kBFloat16 && out.device() == x.device(),
                "oasis_vae: out must be a bfloat16 [", x.size(0), ", ", cout, ", ", x.size(2), ", ", x.size(3), ", ",
                x.size(4), "] on x's device, got ", out.scalar_type(), " ", out.sizes());
    for (int d = 0; d < 5; ++d)  // an expanded output would have threads race on one element
        TORCH_CHECK(out.size(d) == 1 || out.stride(d) != 0, "oasis_vae: out must not be expanded, got strides ",
                    out.strides());
    oasis_vae::FewOutCall c{};
    fill_inputs(c, x, prev, weight, bias, cin, cout);
    c.out = out.data_ptr();
    c.o_sb = out.stride(0); c.o_sc = out.stride(1); c.o_st = out.stride(2);
    c.o_sh = out.stride(3); c.o_sw = out.stride(4);
    c10::cuda::CUDAGuard guard(x.device());
    const cudaError_t err = oasis_vae::conv3d_few_out(c, c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
    TORCH_CHECK(err == cudaSuccess, "oasis_vae: conv3d_few_out failed: ", cudaGetErrorString(err),
                err == cudaErrorInvalidValue ? " (x and prev need 16-byte aligned starts and strides, and the grid "
                                               "fewer than 2^31 programs)" : "");
}

// a channels-last activation on x's device and dtype, every position's channels contiguous, with x's shape (or, not
// `whole`, x's batch and channels: the tail, whose frames the caller checks): its batch stride (the dense position
// stride C is what the kernel assumes)
int64_t positions_of(const at::Tensor& t, const at::Tensor& x, const char* name, bool whole = true) {
    TORCH_CHECK(whole ? t.sizes() == x.sizes()
                      : t.dim() == x.dim() && t.size(0) == x.size(0) && t.size(1) == x.size(1),
                "oasis_vae: ", name, " must be x's shape ", x.sizes(), ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.device() == x.device(), "oasis_vae: ", name,
                " must be x's dtype and device (", x.scalar_type(), " on ", x.device(), "), got ", t.scalar_type(),
                " on ", t.device());
    // positions (the dims after the channels) flattening with stride C, channels innermost
    int64_t expected = t.size(1);
    for (int d = t.dim() - 1; d >= 2; --d) {
        TORCH_CHECK(t.size(d) == 1 || t.stride(d) == expected, "oasis_vae: ", name,
                    " must be channels-last with its positions dense, got strides ", t.strides());
        expected *= t.size(d);
    }
    TORCH_CHECK(t.size(1) == 1 || t.stride(1) == 1, "oasis_vae: ", name, " must be channels-last, got strides ",
                t.strides());
    return t.size(0) == 1 ? expected : t.stride(0);
}

void norm_silu(const at::Tensor& x, const at::Tensor& gamma, const c10::optional<at::Tensor>& bias,
               const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& sum,
               const c10::optional<at::Tensor>& tail, bool silu, double eps, const at::Tensor& out) {
    TORCH_CHECK(x.is_cuda() && x.dim() >= 3, "oasis_vae: x must be a CUDA [B, C, ...], got ", x.sizes(), " on ",
                x.device());
    TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
                "oasis_vae: norm_silu takes bfloat16 or float16, got ", x.scalar_type());
    TORCH_CHECK(oasis_vae::norm_takes_channels(int(std::min<int64_t>(x.size(1), 1 << 20))),
                "oasis_vae: norm_silu takes 24 * 2^k channels up to 768, got ", x.size(1));
    TORCH_CHECK(!sum.has_value() || residual.has_value(), "oasis_vae: sum is written only with a residual");
    oasis_vae::NormCall c{};
    c.B = int(x.size(0));
    c.C = int(x.size(1));
    c.positions = x.numel() / std::max<int64_t>(1, x.size(0) * x.size(1));
    c.half = x.scalar_type() == at::kHalf;
    c.silu = silu;
    c.x = x.data_ptr(); c.x_sb = positions_of(x, x, "x");
    c.out = out.data_ptr(); c.o_sb = positions_of(out, x, "out");
    if (residual.has_value()) { c.residual = residual->data_ptr(); c.r_sb = positions_of(*residual, x, "residual"); }
    if (sum.has_value()) { c.sum = sum->data_ptr(); c.z_sb = positions_of(*sum, x, "sum"); }
    if (tail.has_value()) {
        TORCH_CHECK(tail->dim() == x.dim() && tail->size(2) >= 1 && tail->size(2) <= x.size(2), "oasis_vae: tail must "
                    "hold 1 to ", x.size(2), " of x's last frames, got ", tail->sizes());
        for (int d = 3; d < x.dim(); ++d)
            TORCH_CHECK(tail->size(d) == x.size(d), "oasis_vae: tail must be x's frames, got ", tail->sizes());
        c.tail = tail->data_ptr(); c.t_sb = positions_of(*tail, x, "tail", false);
        c.tail_start = c.positions - tail->numel() / std::max<int64_t>(1, tail->size(0) * tail->size(1));
    }
    c.gamma = per_channel(gamma, x, x.size(1), "gamma");
    if (bias.has_value()) c.bias = per_channel(*bias, x, x.size(1), "bias");
    c.eps = float(eps);
    if (x.numel() == 0) return;
    c10::cuda::CUDAGuard guard(x.device());
    const cudaError_t err = oasis_vae::norm_silu(c, c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
    TORCH_CHECK(err == cudaSuccess, "oasis_vae: norm_silu failed: ", cudaGetErrorString(err),
                err == cudaErrorInvalidValue ? " (16-byte aligned starts and batch strides needed)" : "");
}

}  // namespace

TORCH_LIBRARY(oasis_vae, m) {
    m.def("conv3d_k3(Tensor x, Tensor? prev, Tensor weight, Tensor? bias, Tensor? residual, Tensor? norm, "
          "Tensor(b!)? tail, Tensor(a!) out) -> ()");
    m.def("conv3d_few_out(Tensor x, Tensor? prev, Tensor weight, Tensor? bias, Tensor(a!) out) -> ()");
    m.def("norm_silu(Tensor x, Tensor gamma, Tensor? bias, Tensor? residual, Tensor(b!)? sum, Tensor(c!)? tail, "
          "bool silu, float eps, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(oasis_vae, CUDA, m) {
    m.impl("conv3d_k3", &conv3d_k3);
    m.impl("conv3d_few_out", &conv3d_few_out);
    m.impl("norm_silu", &norm_silu);
}
