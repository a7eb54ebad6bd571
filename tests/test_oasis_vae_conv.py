"""oasis.vae_conv: the VAE's convolutions on the fastest cuDNN engine, then bias and residual.

On the CPU: the PyTorch path (what every case the tuned path does not serve runs) against a float64
expression, and the layout helpers. On a GPU with the cuDNN frontend installed: the tuned path against
a float64 reference on awkward shapes, within twice the error of PyTorch's own bf16/fp16 convolution
(plus a small floor), and a whole tiny VAE with ``autotune`` on against its float64 twin.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from oasis import vae_conv, vae_kernels
from oasis.vae_conv import _channels_last_strides, _dense_channels_last, conv, upsample2x_conv3x3
from oasis.vae_kernels import attention_by_products, attention_usable, attention_wide, conv3d_few_in, softmax_rows


@pytest.fixture(autouse=True)
def choices_in_tmp(tmp_path):
    """Each test keeps its engine choices in its own folder (never the user's cache)."""
    saved = dict(vae_conv._CHOICES)
    vae_conv.set_choices_file(tmp_path / "choices.json")
    yield tmp_path / "choices.json"
    vae_conv._CHOICES.clear()
    vae_conv._CHOICES.update(saved)


def _reference(x, w, b, r, stride, padding, padding_after=None):
    fn = F.conv3d if x.dim() == 5 else F.conv2d
    x = x.double()
    if padding_after is not None:  # explicit zeros: ``padding`` before each spatial dim, these after
        nd = x.dim() - 2
        pre = (padding,) * nd if isinstance(padding, int) else padding
        post = (padding_after,) * nd if isinstance(padding_after, int) else padding_after
        x, padding = F.pad(x, [p for pair in zip(pre[::-1], post[::-1]) for p in pair]), 0
    y = fn(x, w.double(), None if b is None else b.double(), stride, padding)
    return y if r is None else y + r.double()


@pytest.mark.parametrize("shape", [(1, 5, 3, 4, 7), (2, 3, 6, 5), (1, 1, 1, 1, 1), (3, 4, 1, 9)])
def test_channels_last_strides_are_torchs(shape):
    fmt = torch.channels_last_3d if len(shape) == 5 else torch.channels_last
    t = torch.empty(shape, memory_format=fmt)
    assert all(s == 1 or a == b for s, a, b in zip(shape, t.stride(), _channels_last_strides(shape)))
    assert _dense_channels_last(t)
    if shape[1] > 1 and max(shape[2:]) > 1:
        assert not _dense_channels_last(torch.empty(shape))
    # a time slice of a channels-last video is still dense channels-last (N = 1)
    if len(shape) == 5 and shape[0] == 1 and shape[2] > 1:
        assert _dense_channels_last(t[:, :, 1:])


@pytest.mark.parametrize("tuned", [False, True])
def test_torch_path_on_the_cpu(tuned):
    """Off the tuned path (the CPU always is): convolution, then bias and residual, in any dtype."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 6, 4, 5, 7, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 6, 3, 3, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(5, generator=gen, dtype=torch.float64)
    r = torch.randn(1, 5, 2, 5, 7, generator=gen, dtype=torch.float64)
    with vae_conv.tuning(tuned):
        got = conv(x, w, b, r, padding=(0, 1, 1))
        no_extra = conv(x, w, padding=(0, 1, 1))
    torch.testing.assert_close(got, _reference(x, w, b, r, 1, (0, 1, 1)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(no_extra, _reference(x, w, None, None, 1, (0, 1, 1)), rtol=1e-12, atol=1e-12)
    x2, w2 = x[:, :, 0], w[:, :, 0]
    torch.testing.assert_close(conv(x2, w2, b, stride=2), _reference(x2, w2, b, None, 2, 0), rtol=1e-12, atol=1e-12)
    # zeros after each spatial dim only (the encoder's downsampler), and a different count per dim
    for after in (1, (2, 1)):
        got = conv(x2, w2, b, stride=2, padding=0, padding_after=after)
        torch.testing.assert_close(got, _reference(x2, w2, b, None, 2, 0, after), rtol=1e-12, atol=1e-12)


def _triton_here():
    """CUDA, or the CPU under the interpreter (conftest sets TRITON_INTERPRET=1 without CUDA)."""
    import os

    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton kernels run on CUDA or under TRITON_INTERPRET=1")
    return "cuda" if torch.cuda.is_available() else "cpu"


# ((N, C, H, W), Cout): the decoder's spatial upsamplers' kind at awkward sizes (one pixel, one column, output
# channels not a power of two)
UPSAMPLE = [((2, 5, 3, 4), 7), ((1, 3, 1, 1), 2), ((3, 8, 5, 1), 4), ((1, 16, 6, 9), 24)]


@pytest.mark.parametrize("case", range(len(UPSAMPLE)))
def test_upsample_conv_by_phases_is_the_resize_then_the_conv(case):
    """In float64 the four phases' 2x2 convolutions, woven together with the bias, are the nearest-exact resize
    followed by the 3x3 convolution (the same sums, in another order), in either layout, gradients included."""
    shape, cout = UPSAMPLE[case]
    gen = torch.Generator().manual_seed(40 + case)
    x = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(cout, shape[1], 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(cout, generator=gen, dtype=torch.float64, requires_grad=True)
    want = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest-exact"), w, b, padding=1)
    got = upsample2x_conv3x3(x, w, b)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    g = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    for mine, theirs in zip(torch.autograd.grad(got, (x, w, b), g), torch.autograd.grad(want, (x, w, b), g)):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-10)
    with torch.no_grad():
        fmt = torch.channels_last
        got = upsample2x_conv3x3(x.contiguous(memory_format=fmt), w.contiguous(memory_format=fmt), b)
    assert _dense_channels_last(got)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_phase_weights_are_the_taps_each_phase_reads():
    """Each phase's 2x2 kernel, written out by hand from the 3x3 one (an independent statement of the map)."""
    w = torch.randn(2, 3, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    k = vae_conv.phase_weights(w).view(2, 2, 2, 3, 2, 2)  # [a, b, Co, C, rows, cols]
    rows = {0: lambda t: torch.stack([t[..., 0, :], t[..., 1, :] + t[..., 2, :]], -2),
            1: lambda t: torch.stack([t[..., 0, :] + t[..., 1, :], t[..., 2, :]], -2)}
    cols = {0: lambda t: torch.stack([t[..., 0], t[..., 1] + t[..., 2]], -1),
            1: lambda t: torch.stack([t[..., 0] + t[..., 1], t[..., 2]], -1)}
    for a in (0, 1):
        for b in (0, 1):
            torch.testing.assert_close(k[a, b], cols[b](rows[a](w)), rtol=0, atol=1e-14)
    # 16-bit weights: summed wide, rounded once
    wb = w.bfloat16()
    assert torch.equal(vae_conv.phase_weights(wb), vae_conv.phase_weights(wb.double()).bfloat16())


def test_kept_phase_weights_follow_their_weight():
    """The upsampler's phase kernels are made once per weight and made again when it changes: in place on the
    parameter, a new storage, or (through ``.data``, which the version counter does not see) after ``forget_kept``;
    weights made under ``torch.inference_mode()`` (no version counter) are used as they are at each call."""
    gen = torch.Generator().manual_seed(12)
    conv2d = torch.nn.Conv2d(4, 3, 3, padding=1).double().requires_grad_(False)
    x = torch.randn(1, 4, 3, 5, generator=gen, dtype=torch.float64)

    def want():
        return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest-exact"), conv2d.weight, conv2d.bias, padding=1)

    def check():
        torch.testing.assert_close(upsample2x_conv3x3(x, conv2d.weight, conv2d.bias), want(), rtol=0, atol=1e-12)

    with torch.no_grad():
        check()
        conv2d.weight.mul_(-2)  # the version counter
        check()
        conv2d.weight.data = conv2d.weight.data * 3  # a new storage
        check()
        conv2d.weight.data.add_(1)  # unseen by the counter ...
        vae_kernels.forget_kept()  # ... until the kept forms are dropped
        check()
    with torch.inference_mode():
        made = torch.nn.Conv2d(4, 3, 3, padding=1).double()
        y = upsample2x_conv3x3(x, made.weight, made.bias)
        made.weight.mul_(2)
        torch.testing.assert_close(upsample2x_conv3x3(x, made.weight, made.bias), 2 * (y - made.bias.view(-1, 1, 1))
                                   + made.bias.view(-1, 1, 1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_bias", [False, True])
def test_interleave_phases_kernel_matches_torch(dtype, with_bias):
    """The Triton weave (CUDA, or the interpreter on the CPU) gives the torch expression's bits: several
    programs, channels not a power of two, one-pixel images."""
    device = _triton_here()
    gen = torch.Generator().manual_seed(7)
    for shape in ((3, 28, 6, 7), (2, 8, 9, 10), (1, 100, 2, 2)):
        o = torch.randn(shape, generator=gen).to(device, dtype).contiguous(memory_format=torch.channels_last)
        b = torch.randn(shape[1] // 4, generator=gen).to(device, dtype) if with_bias else None
        got = vae_kernels.interleave_phases_triton(o, b)
        want = vae_kernels.interleave_phases_reference(o, b)
        if device == "cpu" and dtype == torch.bfloat16 and with_bias:
            # the interpreter converts float32 to bfloat16 by truncation (dropping the low 16 bits), torch to nearest
            wide = vae_kernels.interleave_phases_reference(o.float(), b.float())
            want = (wide.view(torch.int32) & -65536).view(torch.float32).bfloat16()
        assert _dense_channels_last(got) and got.shape == want.shape
        assert torch.equal(got, want), (got.double() - want.double()).abs().max()


def test_upsample_conv_by_phases_in_16_bits():
    """bf16 (cuDNN's tuned path on a GPU, PyTorch's on the CPU): as close to float64 as the resize and the 3x3
    convolution in bf16 (within 2x plus a floor), although the summed taps are rounded once more."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(11)
    fmt = torch.channels_last
    x = torch.randn(4, 32, 14, 18, generator=gen).to(device, torch.bfloat16).contiguous(memory_format=fmt)
    w = (torch.randn(24, 32, 3, 3, generator=gen) / (32 * 9) ** 0.5).to(device, torch.bfloat16)
    w = w.contiguous(memory_format=fmt)
    b = torch.randn(24, generator=gen).to(device, torch.bfloat16)
    want = F.conv2d(F.interpolate(x.double(), scale_factor=2.0, mode="nearest-exact"), w.double(), b.double(),
                    padding=1)
    with torch.no_grad():
        plain = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest-exact"), w, b, padding=1)
        with vae_conv.tuning():
            got = upsample2x_conv3x3(x, w, b)
    assert got.dtype == torch.bfloat16 and _dense_channels_last(got) and got.isfinite().all()
    err, err_plain = ((t.double() - want).abs().max().item() for t in (got, plain))
    assert err <= 2 * err_plain + 1e-3 * want.abs().max().item(), (err, err_plain)


# (C, Cout, frames in, H, W, kernel): the encoder's first convolution's kind at awkward sizes (one
# channel, four; output channels not a power of two; rows not a multiple of the pixel block; 1x3x3, 3x1x1)
FEW_IN = [(3, 96, 4, 5, 19, (3, 3, 3)), (1, 5, 3, 3, 70, (3, 3, 3)), (4, 16, 2, 4, 7, (1, 3, 3)),
          (3, 12, 3, 2, 5, (3, 1, 1)), (2, 200, 3, 3, 17, (3, 3, 3))]


@pytest.mark.parametrize("case", range(len(FEW_IN)))
def test_few_input_kernel_against_float64(case):
    """``conv3d_few_in`` against float64 within twice PyTorch's own error in the input dtype (float32
    under the interpreter; bf16 and fp16 on a GPU) plus a floor."""
    device = _triton_here()
    c, co, t, h, w, k = FEW_IN[case]
    gen = torch.Generator().manual_seed(60 + case)
    pad = (0, k[1] // 2, k[2] // 2)
    for dtype in ([torch.float32] if device == "cpu" else [torch.bfloat16, torch.float16]):
        x = torch.randn(1, c, t, h, w, generator=gen).to(device, dtype).contiguous(memory_format=torch.channels_last_3d)
        wt = (torch.randn(co, c, *k, generator=gen) / (c * 27) ** 0.5).to(device, dtype)
        b = torch.randn(co, generator=gen).to(device, dtype)
        got = conv3d_few_in(x, wt, b)
        want = F.conv3d(x.double(), wt.double(), b.double(), padding=pad)
        plain = F.conv3d(x, wt, b, padding=pad)
        assert got.shape == want.shape and got.dtype == dtype and got.isfinite().all()
        assert got.stride(1) == 1  # channels-last, as the encoder's activations
        err, err_plain = ((v.double() - want).abs().max().item() for v in (got, plain))
        assert err <= 2 * err_plain + 1e-6 + (1e-3 if dtype != torch.float32 else 0), (dtype, err, err_plain)
    with pytest.raises(ValueError, match="channels-last"):
        conv3d_few_in(torch.randn(1, 3, t, h, w, device=device), torch.randn(co, 3, *k, device=device))
    with pytest.raises(ValueError, match="<= 4 input channels"):
        conv3d_few_in(torch.randn(1, 5, t, h, w, device=device).contiguous(memory_format=torch.channels_last_3d),
                      torch.randn(co, 5, *k, device=device))


def test_few_input_kernel_batches_and_time_slices():
    """Two videos, and a time slice of a longer buffer (the cache's frames in front), as the encoder
    passes them."""
    device = _triton_here()
    gen = torch.Generator().manual_seed(7)
    buf = torch.randn(2, 3, 7, 5, 21, generator=gen).to(device).contiguous(memory_format=torch.channels_last_3d)
    x = buf[:, :, 1:6]
    wt = torch.randn(24, 3, 3, 3, 3, generator=gen).to(device) / 9
    b = torch.randn(24, generator=gen).to(device)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    x, wt, b = x.to(dtype), wt.to(dtype), b.to(dtype)
    got = conv3d_few_in(x, wt, b)
    want = F.conv3d(x.double(), wt.double(), b.double(), padding=(0, 1, 1))
    plain = F.conv3d(x, wt, b, padding=(0, 1, 1))
    err, err_plain = ((v.double() - want).abs().max().item() for v in (got, plain))
    assert got.shape == (2, 24, 3, 5, 21) and err <= 2 * err_plain + 1e-6 + (1e-3 if dtype != torch.float32 else 0)


def test_only_first_convolutions_take_the_few_input_kernel(monkeypatch):
    """The route: 3x3x3 from <= 4 channels, channels-last, spatially padded by half, stride 1; not
    a 1x1x1 projection or a many-channel convolution, not channels-first, not with gradients wanted."""
    monkeypatch.setattr(vae_kernels, "on_triton_device", lambda t: True)
    x = torch.randn(1, 3, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d)
    first, projection = torch.randn(96, 3, 3, 3, 3), torch.randn(16, 3, 1, 1, 1)
    wide = torch.randn(16, 8, 3, 3, 3)
    assert vae_conv._few_inputs(x, first, None, (1, 1, 1), (0, 1, 1))
    assert not vae_conv._few_inputs(x, projection, None, (1, 1, 1), (0, 0, 0))
    assert not vae_conv._few_inputs(x, first, None, (2, 1, 1), (0, 1, 1))
    assert not vae_conv._few_inputs(x, first, None, (1, 1, 1), (1, 1, 1))
    x8 = torch.randn(1, 8, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d)
    assert not vae_conv._few_inputs(x8, wide, None, (1, 1, 1), (0, 1, 1))
    xf = torch.randn(1, 3, 4, 5, 6)
    assert not vae_conv._few_inputs(xf, first, None, (1, 1, 1), (0, 1, 1))
    assert not vae_conv._few_inputs(x, first.requires_grad_(), None, (1, 1, 1), (0, 1, 1))


def test_the_encoders_first_convolution_takes_the_kernel(monkeypatch):
    """Inside the model (the CPU routed to the Triton passes under the interpreter): the encoder's
    first convolution runs on ``conv3d_few_in`` and gives the torch path's numbers."""
    device = _triton_here()
    from oasis import WanVAE
    from oasis.wan_vae import WanVAEConfig

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the torch path in float32 proper
    torch.manual_seed(0)
    vae = WanVAE(WanVAEConfig(base_dim=16, dim_mult=(1, 2), temperal_downsample=(True,), num_res_blocks=0),
                 decoder=False).eval().to(device)
    vae.channels_last()
    conv_in = vae.encoder.conv_in
    x = torch.randn(1, 3, 3, 6, 21, device=device).contiguous(memory_format=torch.channels_last_3d)
    prev = torch.randn(1, 3, 2, 6, 21, device=device).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        monkeypatch.setattr(vae_kernels, "on_triton_device", lambda t: False)
        want = conv_in(x, {conv_in: prev.clone()})
        calls = []
        real = vae_conv.conv3d_few_in
        monkeypatch.setattr(vae_kernels, "on_triton_device", lambda t: True)
        monkeypatch.setattr(vae_conv, "conv3d_few_in", lambda *a: calls.append(1) or real(*a))
        got = conv_in(x, {conv_in: prev.clone()})
    assert calls, "the kernel did not run"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# (frames, tokens, D): the middle block's one-head attention (D = 384 at Wan2.1's width) at odd
# sizes: tokens not a multiple of the blocks, D not a power of two, D below one chunk
ATTN = [(2, 37, 384), (1, 70, 64), (1, 20, 208), (3, 5, 16), (1, 130, 256)]  # 208: a partial second chunk


@pytest.mark.parametrize("case", range(len(ATTN)))
def test_wide_attention_against_float64(case):
    """``attention_wide`` on q, k, v sliced from one [N, L, 3D] projection (the VAE's layout) against
    float64 within twice SDPA's own error in the input dtype plus a floor."""
    device = _triton_here()
    n, length, d = ATTN[case]
    gen = torch.Generator().manual_seed(80 + case)
    for dtype in ([torch.float32] if device == "cpu" else [torch.bfloat16, torch.float16]):
        qkv = torch.randn(n, length, 3 * d, generator=gen).to(device, dtype)
        q, k, v = qkv.chunk(3, dim=-1)
        assert attention_usable(q, k, v) == (device == "cuda")
        got = attention_wide(q, k, v)
        want = F.scaled_dot_product_attention(*(t.double()[:, None] for t in (q, k, v)))[:, 0]
        plain = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        assert got.shape == want.shape and got.dtype == dtype and got.isfinite().all() and got.is_contiguous()
        err, err_plain = ((x.double() - want).abs().max().item() for x in (got, plain))
        assert err <= 2 * err_plain + 1e-6 + (1e-3 if dtype != torch.float32 else 0), (dtype, err, err_plain)


@pytest.mark.parametrize("case", range(len(ATTN)))
def test_attention_by_products_against_float64(case, monkeypatch):
    """``attention_by_products`` (float32 scores, the Triton row softmax, the products) on the VAE's layout
    against float64 within twice SDPA's own error in the input dtype plus a floor, frames in one group and
    frames one at a time alike."""
    device = _triton_here()
    if device == "cpu":  # the interpreter stands in for the GPU
        monkeypatch.setattr(vae_kernels, "on_triton_device", lambda t: True)
    n, length, d = ATTN[case]
    gen = torch.Generator().manual_seed(90 + case)
    for dtype in ([torch.float32, torch.float16] if device == "cpu" else [torch.bfloat16, torch.float16]):
        qkv = (torch.randn(n, length, 3 * d, generator=gen) * 2).to(device, dtype)
        q, k, v = qkv.chunk(3, dim=-1)
        got = attention_by_products(q, k, v)
        want = F.scaled_dot_product_attention(*(t.double()[:, None] for t in (q, k, v)))[:, 0]
        plain = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        assert got.shape == want.shape and got.dtype == dtype and got.isfinite().all() and got.is_contiguous()
        # frames one at a time: cuBLAS may pick another kernel for another batch, so the same bound, not bits
        one_at_a_time = attention_by_products(q, k, v, scores_bytes=1)
        assert one_at_a_time.shape == want.shape and one_at_a_time.isfinite().all()
        bound = 2 * ((plain.double() - want).abs().max().item()) + 1e-6 + (1e-3 if dtype != torch.float32 else 0)
        for x in (got, one_at_a_time):
            assert (x.double() - want).abs().max().item() <= bound, (dtype, bound)
        if dtype != torch.float32:  # the product takes both parts of P: float64 (P_hi + P_lo) v, then rounded
            pairs = softmax_rows(vae_kernels._scores_float32(q, k), d ** -0.5, dtype, split=True)
            split = torch.matmul(pairs[..., 0::2].double() + pairs[..., 1::2].double(), v.double())
            half_ulp = torch.finfo(dtype).eps / 2 * split.abs()
            assert ((got.double() - split).abs() <= half_ulp + 1e-5 * split.abs() + 1e-6).all(), dtype


def test_softmax_rows_split_without_triton_and_its_errors():
    """Off the Triton device the split is torch's softmax written over the scores the same way (pairs of P_hi,
    P_lo); a split to float32, of non-float32 or non-contiguous scores, is refused before anything is
    written."""
    gen = torch.Generator().manual_seed(6)
    s = torch.randn(2, 5, 33, generator=gen) * 20
    scores = s.clone()
    parts = softmax_rows(scores, 0.25, torch.bfloat16, split=True)
    assert parts.shape == (2, 5, 66) and parts.data_ptr() == scores.data_ptr()
    p = torch.softmax(s.double() * 0.25, dim=-1)
    assert torch.equal(parts[..., 0::2], torch.softmax(s * 0.25, -1).to(torch.bfloat16))
    assert ((parts[..., 0::2].double() + parts[..., 1::2].double() - p).abs() <= 2 ** -15 * p + 1e-7).all()
    for args, says in [((s.clone(), 0.25, torch.float32), "dtype torch.float32"),
                       ((s.double(), 0.25, torch.float16), "torch.float64 scores"),
                       ((s.clone().transpose(1, 2), 0.25, torch.float16), "contiguous: False")]:
        before = args[0].clone()
        with pytest.raises(ValueError, match=says):
            softmax_rows(*args, split=True)
        assert torch.equal(args[0], before)


def test_softmax_rows_kernel_against_torch(monkeypatch):
    """The row pass: rows longer than its block (several chunks, a partial last one), rows with a large
    spread, the probabilities in the asked dtype and summing to one; split, written over the scores as pairs
    whose two parts add up to P within ~16 bits (float32's softmax error, not the dtype's rounding)."""
    device = _triton_here()
    if device == "cpu":  # the interpreter stands in for the GPU
        monkeypatch.setattr(vae_kernels, "on_triton_device", lambda t: True)
    ran = []
    real = vae_kernels._softmax_rows_kernel
    monkeypatch.setattr(vae_kernels, "_softmax_rows_kernel", type("Spy", (), {
        "__getitem__": lambda self, grid: (ran.append(grid), real[grid])[1]})())
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    gen = torch.Generator().manual_seed(5)
    for length in (7, 300, 9000):
        s = (torch.randn(3, length, generator=gen) * 30).to(device)
        for dtype in dtypes:
            got = softmax_rows(s, 0.125, dtype)
            want = torch.softmax(s.double() * 0.125, dim=-1)
            plain = torch.softmax(s * 0.125, dim=-1).to(dtype)  # torch's float32 softmax, then rounded
            assert got.dtype == dtype and got.shape == s.shape and got.isfinite().all()
            err, err_plain = ((x.double() - want).abs().max().item() for x in (got, plain))
            # the interpreter converts float32 to bfloat16 by truncation (up to one step), torch to nearest
            truncates = device == "cpu" and dtype == torch.bfloat16
            eps = torch.finfo(dtype).eps
            if truncates:
                assert ((got.double() - want).abs() <= eps * want + 1e-7).all(), (length, dtype)
            else:
                assert err <= 2 * err_plain + 1e-7, (length, dtype, err, err_plain)
            assert torch.allclose(got.double().sum(-1), torch.ones(3, dtype=torch.float64, device=device),
                                  atol=1e-2 if dtype == torch.bfloat16 else 2e-3)
            if dtype == torch.float32:
                continue
            scores = s.clone()
            parts = softmax_rows(scores, 0.125, dtype, split=True)  # written over the scores
            assert parts.dtype == dtype and parts.shape == (3, 2 * length)
            assert parts.data_ptr() == scores.data_ptr(), "P was not written over the scores"
            hi, lo = parts[:, 0::2], parts[:, 1::2]
            err_hi = (hi.double() - want).abs().max().item()  # the first of each pair: P rounded
            assert err_hi <= (2 * err if truncates else 2 * err_plain) + 1e-7, (length, dtype, err_hi, err_plain)
            # bf16: P to ~16 bits; fp16: to ~2^-25 absolute (a small P's remainder is an fp16 subnormal)
            joined = hi.double() + lo.double()
            err_f32 = (torch.softmax(s * 0.125, -1).double() - want).abs().max().item()
            rel = 2 ** -14 if truncates else 2 ** -15
            assert ((joined - want).abs() <= rel * want + 2 * err_f32 + 1e-12).all(), (length, dtype)
            assert (joined - want).abs().max().item() < err_plain / 50, (length, dtype, err_plain)
    assert len(ran) == 3 * (2 * len(dtypes) - 1), "the Triton row pass did not run"


def test_wide_attention_takes_the_products_for_long_frames(monkeypatch):
    """16-bit frames of PRODUCTS_MIN_TOKENS tokens or more go to attention_by_products; float32 and shorter
    frames to the flash kernel."""
    device = _triton_here()
    calls = []  # the route is what is checked here (the products' numbers: the float64 test above)
    monkeypatch.setattr(vae_kernels, "attention_by_products",
                        lambda q, k, v: calls.append(q.shape) or torch.empty(q.shape, dtype=q.dtype, device=q.device))
    monkeypatch.setattr(vae_kernels, "PRODUCTS_MIN_TOKENS", 40)
    monkeypatch.setattr(vae_kernels, "float32_products", lambda device: True)
    half = torch.randn(1, 40, 3 * 64).to(device, torch.float16).chunk(3, dim=-1)
    out = attention_wide(*half)
    assert calls == [(1, 40, 64)] and out.dtype == torch.float16
    attention_wide(*torch.randn(1, 39, 3 * 64).to(device, torch.float16).chunk(3, dim=-1))
    attention_wide(*torch.randn(1, 40, 3 * 64).to(device).chunk(3, dim=-1))
    assert calls == [(1, 40, 64)]
    monkeypatch.setattr(vae_kernels, "float32_products", lambda device: False)  # no fast product: the flash kernel
    attention_wide(*torch.randn(1, 40, 3 * 64).to(device, torch.float16).chunk(3, dim=-1))
    assert calls == [(1, 40, 64)]


def test_float32_products_probe():
    """The probe answers per device, once: False on the CPU (torch has no 16-bit bmm to float32 there), and on
    a GPU whatever torch has."""
    assert vae_kernels.float32_products("cpu") is False and torch.device("cpu") in vae_kernels._FLOAT32_PRODUCTS
    if torch.cuda.is_available():
        assert isinstance(vae_kernels.float32_products("cuda"), bool)


def test_wide_attention_route(monkeypatch):
    """Taken for D a multiple of 16 up to 384 without gradients wanted; not for D = 400 or 24, nor
    under autograd; and the VAE's attention block gives SDPA's numbers through it."""
    device = _triton_here()
    if device == "cpu":  # the interpreter stands in for the GPU
        monkeypatch.setattr(vae_kernels, "on_triton_device", lambda t: True)
    q = torch.randn(1, 10, 384, device=device)
    assert attention_usable(q, q, q)
    assert not attention_usable(*(torch.randn(1, 10, 400, device=device),) * 3)
    assert not attention_usable(*(torch.randn(1, 10, 24, device=device),) * 3)
    assert not attention_usable(q.requires_grad_(), q, q)
    from oasis import wan_vae
    from oasis.wan_vae import AttentionBlock

    torch.manual_seed(2)
    block = AttentionBlock(64).eval().to(device)
    x = torch.randn(1, 64, 3, 5, 7, device=device)  # 3 frames of 5x7
    calls = []
    monkeypatch.setattr(wan_vae, "attention_wide", lambda *a: calls.append(1) or attention_wide(*a))
    with torch.no_grad():
        got = block(x)
        assert calls, "the kernel did not run"
        monkeypatch.setattr(vae_kernels, "on_triton_device", lambda t: False)
        want = block(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_autotune_values_are_checked():
    from oasis import WanVAE
    from oasis.wan_vae import WanVAEConfig

    vae = WanVAE(WanVAEConfig(base_dim=8, dim_mult=(1, 2), temperal_downsample=(True,), num_res_blocks=0))
    z = torch.randn(1, 16, 1, 2, 2)
    for bad in (1, "yes", None):
        vae.autotune = bad
        with pytest.raises(ValueError, match="autotune must be"):
            vae.decode(z)


def test_tuning_is_scoped():
    assert not vae_conv._TUNING.get()
    with vae_conv.tuning():
        assert vae_conv._TUNING.get()
        with vae_conv.tuning(False):
            assert not vae_conv._TUNING.get()
        assert vae_conv._TUNING.get()
    assert not vae_conv._TUNING.get()


def test_choices_file_written_merged_and_forgiving(choices_in_tmp, tmp_path, caplog):
    path = choices_in_tmp
    assert vae_conv.choices_file() == path and vae_conv._choices() == {}
    vae_conv._record_choice("gpu|9|a", {"index": 3, "name": "eng62_k2=3", "ms": 1.5})
    assert json.loads(path.read_text()) == {"gpu|9|a": {"index": 3, "name": "eng62_k2=3", "ms": 1.5}}
    # another process added an entry meanwhile: kept when this one records its next
    other = json.loads(path.read_text())
    other["gpu|9|b"] = {"index": 0, "name": "eng22", "ms": 2.0}
    path.write_text(json.dumps(other))
    vae_conv._record_choice("gpu|9|c", {"index": 1, "name": "eng62", "ms": 0.5})
    assert set(json.loads(path.read_text())) == {"gpu|9|a", "gpu|9|b", "gpu|9|c"}
    vae_conv.set_choices_file(path)  # read again: what the file holds
    assert set(vae_conv._choices()) == {"gpu|9|a", "gpu|9|b", "gpu|9|c"}
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    vae_conv.set_choices_file(bad)
    with caplog.at_level("WARNING", logger="oasis.vae_conv"):
        assert vae_conv._choices() == {}
    assert "ignoring the cuDNN engine choices" in caplog.text
    vae_conv.set_choices_file(path)
    vae_conv._forget_choice("gpu|9|b")  # a choice that failed to run: gone from memory and the file
    assert set(json.loads(path.read_text())) == {"gpu|9|a", "gpu|9|c"} and "gpu|9|b" not in vae_conv._choices()
    assert not list(tmp_path.glob("*.tmp"))
    vae_conv.set_choices_file(None)
    vae_conv._record_choice("gpu|9|d", {"index": 0, "name": "x", "ms": 1.0})
    assert vae_conv.choices_file() is None and bad.read_text() == "[1, 2"


def test_default_choices_file_follows_xdg(monkeypatch, tmp_path):
    vae_conv._CHOICES.update(set=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert vae_conv.choices_file() == tmp_path / "oasis" / "cudnn_conv_choices.json"


needs_frontend = pytest.mark.skipif(not torch.cuda.is_available() or vae_conv.frontend_missing() is not None,
                                    reason="needs CUDA and the cuDNN frontend (nvidia-cudnn-frontend)")

# (x shape, Cout, kernel, stride, padding, bias, residual[, padding after]): the VAE's kinds of
# convolution at odd sizes
CASES = [
    ((1, 24, 4, 13, 19), 40, 3, 1, (0, 1, 1), True, True),  # 3x3x3 behind a 2-frame cache, with a residual
    ((1, 32, 3, 9, 11), 32, 3, 1, (0, 1, 1), False, False),
    ((1, 16, 5, 7, 6), 8, (3, 1, 1), 1, 0, True, False),  # the temporal upsampler's time convolution
    ((1, 16, 4, 7, 10), 3, 3, 1, (0, 1, 1), True, False),  # an output convolution to 3 channels
    ((1, 24, 3, 6, 5), 40, 1, 1, 0, False, False),  # a 1x1x1 shortcut
    ((5, 32, 14, 18), 16, 3, 1, 1, True, False),  # the spatial upsampler's 3x3 (frames as a batch)
    ((3, 16, 11, 13), 16, 3, 2, 0, True, False),
    ((3, 16, 11, 13), 16, 3, 2, 0, True, False, 1),  # the encoder's stride-2 downsampler (right/bottom zeros)
    ((2, 24, 10, 15), 24, 3, 2, 0, False, False, 1),
]


@needs_frontend
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_tuned_convolution_against_float64(case, dtype):
    shape, cout, k, stride, padding, with_bias, with_res, *after = CASES[case]
    after = after[0] if after else None
    nd = len(shape) - 2
    fmt = torch.channels_last_3d if nd == 3 else torch.channels_last
    k = (k,) * nd if isinstance(k, int) else k
    gen = torch.Generator(device="cuda").manual_seed(100 + case)
    x = torch.randn(shape, device="cuda", generator=gen).to(dtype).contiguous(memory_format=fmt)
    w = (torch.randn(cout, shape[1], *k, device="cuda", generator=gen) / (shape[1] * 27) ** 0.5).to(dtype)
    w = w.contiguous(memory_format=fmt)
    b = torch.randn(cout, device="cuda", generator=gen) if with_bias else None
    st = (stride,) * nd if isinstance(stride, int) else stride
    pd = (padding,) * nd if isinstance(padding, int) else padding
    pa = pd if after is None else (after,) * nd
    out_shape = vae_conv._out_shape(x, w, st, pd, pa)
    r = torch.randn(out_shape, device="cuda", generator=gen).to(dtype).contiguous(memory_format=fmt) \
        if with_res else None
    want = _reference(x, w, b, r, st, pd, after)
    plans = vae_conv.plan_count()
    with torch.no_grad():
        plain = conv(x, w, b, r, stride=stride, padding=padding, padding_after=after)
        with vae_conv.tuning():
            got = conv(x, w, b, r, stride=stride, padding=padding, padding_after=after)
            again = conv(x, w, b, r, stride=stride, padding=padding, padding_after=after)
    key = (x.device.index, dtype, tuple(x.shape), tuple(w.shape), st, pd, pa)
    assert vae_conv.plan_count() == plans + 1 and vae_conv._PLANS[key] is not None, "the tuned path did not run"
    plan = vae_conv._PLANS[key]
    assert plan.best is not None and plan.times_ms, plan.name
    assert got.shape == want.shape and got.dtype == dtype and _dense_channels_last(got)
    assert got.isfinite().all()
    torch.testing.assert_close(again, got, rtol=0, atol=0)  # the chosen engine from then on
    err = (got.double() - want).abs().max().item()
    err_plain = (plain.double() - want).abs().max().item()
    assert err <= 2 * err_plain + 1e-3 * want.abs().max().item(), (err, err_plain, plan.name)


@needs_frontend
def test_a_recorded_choice_is_reused_by_a_later_process(choices_in_tmp):
    """The engine timed once is recorded; with the plans forgotten (as in a new process) it is built
    again without timing, and gives the same bits."""
    x = torch.randn(1, 32, 4, 24, 40, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(48, 32, 3, 3, 3, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad(), vae_conv.tuning():
        first = conv(x, w, padding=(0, 1, 1))
        plan = [p for p in vae_conv._PLANS.values() if p is not None and p.key[2] == tuple(x.shape)][-1]
        recorded = json.loads(choices_in_tmp.read_text())[plan.record_key]
        assert plan.times_ms and recorded["index"] == plan.best and recorded["name"] == plan.name
        vae_conv.clear_plans()
        vae_conv.set_choices_file(choices_in_tmp)
        again = conv(x, w, padding=(0, 1, 1))
        plan2 = vae_conv._PLANS[plan.key]
    assert plan2.best == plan.best and not plan2.times_ms, "timed again instead of reusing the choice"
    torch.testing.assert_close(again, first, rtol=0, atol=0)


@needs_frontend
def test_grad_and_odd_layouts_take_the_torch_path():
    x = torch.randn(1, 8, 4, 6, 6, device="cuda", dtype=torch.bfloat16)  # channels-first
    w = torch.randn(8, 8, 3, 3, 3, device="cuda", dtype=torch.bfloat16)
    plans = vae_conv.plan_count()
    with vae_conv.tuning():
        with torch.no_grad():  # the layout alone sends it to PyTorch
            conv(x, w, padding=(0, 1, 1))
            # a 16-byte-misaligned view, dense channels-last: PyTorch's path as well
            odd = torch.empty(1 * 8 * 4 * 6 * 6 + 1, device="cuda", dtype=torch.bfloat16)[1:]
            odd = odd.view(1, 4, 6, 6, 8).permute(0, 4, 1, 2, 3)
            assert _dense_channels_last(odd) and odd.data_ptr() % 16
            conv(odd, w.contiguous(memory_format=torch.channels_last_3d), padding=(0, 1, 1))
        assert vae_conv.plan_count() == plans
        xl = x.contiguous(memory_format=torch.channels_last_3d).requires_grad_()
        y = conv(xl, w.contiguous(memory_format=torch.channels_last_3d), padding=(0, 1, 1))
    assert vae_conv.plan_count() == plans
    y.float().sum().backward()
    assert xl.grad is not None and xl.grad.isfinite().all()


@needs_frontend
def test_a_tuned_vae_against_its_float64_twin():
    """A tiny VAE, channels-last bf16 with ``autotune``: decode and encode as close to float64 as the
    untuned bf16 VAE is (within 2x plus a floor), and the tuned path used for its convolutions."""
    from oasis import WanVAE
    from oasis.wan_vae import WanVAEConfig

    torch.manual_seed(0)
    cfg = WanVAEConfig(base_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1)
    vae64 = WanVAE(cfg).double().eval()
    with torch.no_grad():
        for p in vae64.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    vae64 = vae64.cuda()
    vae = WanVAE(cfg).eval()
    vae.load_state_dict(vae64.state_dict())
    vae = vae.to("cuda", torch.bfloat16).channels_last()
    z = torch.randn(1, 16, 3, 6, 10, device="cuda", dtype=torch.float64)
    x = torch.rand(1, 3, 9, 48, 80, device="cuda", dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        want_d, want_e = vae64.decode(z, chunk=1), vae64.encode(x, chunk=1)
        plain_d = vae.decode(z.bfloat16(), chunk=1, piece_frames=2)
        plain_e = vae.encode(x.bfloat16(), chunk=1)
        plans = vae_conv.plan_count()
        vae.autotune = True
        got_d = vae.decode(z.bfloat16(), chunk=1, piece_frames=2)
        got_e = vae.encode(x.bfloat16(), chunk=1)
    assert sum(p is not None and p.best is not None for p in vae_conv._PLANS.values()) > plans + 5
    for got, plain, want in ((got_d, plain_d, want_d), (got_e, plain_e, want_e)):
        assert got.isfinite().all()
        err, err_plain = ((t.double() - want).abs().max().item() for t in (got, plain))
        assert err <= 2 * err_plain + 2e-3, (err, err_plain)
