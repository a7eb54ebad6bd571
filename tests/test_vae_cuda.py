"""The VAE's CUDA convolution (csrc/vae_conv/, oasis.vae_cuda): compiled for sm_90a here (no spills, no
serialised wgmma), the weight packing and the predicate on the CPU; on a Hopper GPU, parity with a float64
convolution on awkward shapes under FlashAttention's rule (error at most 2x that of cuDNN's bf16
convolution on the same inputs, plus a floor), and nothing written outside the output."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from oasis import vae_cuda

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ptxas_report():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc on this machine")
    report = ""
    for source in ("vae_conv.cu", "few_out.cu"):
        proc = subprocess.run([nvcc, *vae_cuda.NVCC_FLAGS, "-Xptxas", "-v", "-c", str(vae_cuda.SOURCES / source),
                               "-o", "/dev/null"], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        report += proc.stderr
    return report


@pytest.mark.slow  # ~10 s of nvcc on 2 cores
def test_kernels_compile_for_sm90a_without_spills_or_serialised_wgmma(ptxas_report):
    entries = re.findall(r"Compiling entry function '(\w+)' for 'sm_90a'\n(.*?)(?=ptxas info\s+: Compiling|\Z)",
                         ptxas_report, flags=re.S)
    names = [n for n, _ in entries if "conv3d_k3_kernel" in n]
    assert len(names) == 2, names  # N tiles of 96 and 192
    few = [body for n, body in entries if "conv3d_few_out_kernel" in n]
    assert len(few) == 1, [n for n, _ in entries]
    # two programs an SM: __launch_bounds__(256, 2) caps it at 128 registers
    assert int(re.search(r"Used (\d+) registers", few[0]).group(1)) <= 128, few[0]
    for name, body in entries:
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", body)
        assert spill and spill.groups() == ("0", "0"), (name, body)
    assert "wgmma.mma_async instructions are serialized" not in ptxas_report


def test_pack_weight_orders_taps_then_channels():
    w = torch.randn(96, 32, 3, 3, 3)
    p = vae_cuda.pack_weight(w)
    assert p.shape == (96, 27 * 32) and p.dtype == torch.bfloat16 and p.is_contiguous()
    for o, dt, dy, dx, c in ((0, 0, 0, 0, 0), (5, 1, 2, 0, 7), (95, 2, 2, 2, 31)):
        assert p[o, (9 * dt + 3 * dy + dx) * 32 + c] == w[o, c, dt, dy, dx].bfloat16()
    assert vae_cuda.pack_weight(w) is p  # kept while the weight is unchanged
    w.mul_(2)
    assert vae_cuda.pack_weight(w) is not p


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="needs a Hopper GPU (sm_90a)")
def test_why_not_leaves_96_input_channels_to_cudnn():
    x = torch.zeros(1, 96, 2, 4, 64, dtype=torch.bfloat16, device="cuda").contiguous(
        memory_format=torch.channels_last_3d)
    w = torch.zeros(96, 96, 3, 3, 3, dtype=torch.bfloat16, device="cuda")
    assert "a multiple of 64" in vae_cuda.why_not(x, w)


def test_why_not_names_the_reason_on_the_cpu():
    x = torch.zeros(1, 96, 2, 4, 4, dtype=torch.bfloat16)
    w = torch.zeros(96, 96, 3, 3, 3, dtype=torch.bfloat16)
    assert "not a CUDA device" in vae_cuda.why_not(x, w)
    with pytest.raises(ValueError, match="does not take this call"):
        vae_cuda.conv3d_k3(x, w)


def test_channel_rule_on_the_cpu():
    """Which channel counts the kernel takes, and with the next norm: 64-channel input stages, 96-wide output
    tiles, the norm where one tile holds every output channel."""
    assert vae_cuda.channels_why_not(192, 192) is None and vae_cuda.channels_why_not(192, 192, norm=True) is None
    assert vae_cuda.channels_why_not(384, 384) is None
    assert "multiple of 64 (got 96)" in vae_cuda.channels_why_not(96, 96)
    assert "multiple of 96 (got 128)" in vae_cuda.channels_why_not(64, 128)
    assert "needs 96 or 192 output channels, got 384" in vae_cuda.channels_why_not(192, 384, norm=True)


def reference(x, weight, bias=None, prev=None, residual=None, dtype=torch.float64):
    """The same convolution in ``dtype`` (float64: the reference; bf16: cuDNN's, the rule's yardstick):
    :func:`oasis.vae_cuda.conv3d_k3_reference` on the inputs cast."""
    def cast(t):
        return None if t is None else t.to(dtype)

    return vae_cuda.conv3d_k3_reference(cast(x), cast(weight), cast(bias), prev=cast(prev), residual=cast(residual))


hopper = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)),
                            reason="needs a Hopper GPU (sm_90a)")

# (B, Cin, Cout, T, H, W, prev, bias, residual): channel counts of the decoder (192, 384) and of none (64,
# 128), widths no 64-pixel segment divides, odd segment counts, T = 1
CASES = [
    (1, 192, 96, 2, 9, 70, True, True, True),
    (2, 64, 96, 1, 5, 64, False, True, False),
    (1, 192, 192, 3, 4, 33, True, False, True),
    (1, 384, 384, 2, 3, 130, True, True, False),
    (1, 192, 384, 2, 6, 20, False, True, True),
    (2, 128, 96, 3, 7, 1, True, False, False),
    (1, 64, 192, 2, 1, 129, True, True, True),
]


def random_call(case):
    """A case's random inputs on the GPU, seeded by the case: x, prev, weight, bias, residual and the generator
    (bf16 channels-last tensors; the bias float32, as a layer's may be)."""
    b, cin, cout, t, h, w, has_prev, has_bias, has_res = case[:9]
    g = torch.Generator(device="cuda").manual_seed(hash(case) % 2**31)

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", generator=g).bfloat16().contiguous(memory_format=torch.channels_last_3d)

    x = rnd(b, cin, t, h, w)
    prev = rnd(b, cin, 2, h, w) if has_prev else None
    weight = (torch.randn(cout, cin, 3, 3, 3, device="cuda", generator=g) * (27 * cin) ** -0.5).bfloat16()
    bias = torch.randn(cout, device="cuda", generator=g) if has_bias else None
    residual = rnd(b, cout, t, h, w) if has_res else None
    return x, prev, weight, bias, residual, g


def framed(b, c, frames, h, w):
    """A bf16 channels-last ``[b, c, frames, h, w]`` inside a buffer of NaN frames either side (what a kernel
    writes past it is caught): the buffer and the view."""
    big = torch.full((b, c, frames + 2, h, w), float("nan"), device="cuda", dtype=torch.bfloat16)
    big = big.contiguous(memory_format=torch.channels_last_3d)
    return big, big[:, :, 1:1 + frames]


@hopper
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:6])) + "-" + "".join(
    n for n, on in zip("pbr", c[6:]) if on))
def test_conv3d_k3_matches_float64(case):
    b, cin, cout, t, h, w, has_prev, has_bias, has_res = case
    x, prev, weight, bias, residual, g = random_call(case)
    big, out = framed(b, cout, t, h, w)
    vae_cuda.conv3d_k3(x, weight, bias, prev=prev, residual=residual, out=out)
    torch.cuda.synchronize()
    assert torch.isnan(big[:, :, 0]).all() and torch.isnan(big[:, :, t + 1]).all(), "wrote outside its output"
    assert out.isfinite().all()
    exact = reference(x, weight, bias, prev, residual)
    cudnn = reference(x, weight, None if bias is None else bias.bfloat16(), prev, residual, torch.bfloat16)
    err = (out.double() - exact).abs().max().item()
    base = (cudnn.double() - exact).abs().max().item()
    assert err <= 2 * base + 1e-2, (err, base)


# (B, Cin, Cout, T, H, W, prev, bias, residual, tail frames): the norm takes 96 or 192 output channels
NORM_CASES = [
    (1, 192, 96, 3, 5, 70, True, True, False, 2),
    (2, 192, 192, 1, 4, 33, False, True, True, 1),
    (1, 64, 192, 2, 3, 129, True, False, False, 2),
    (1, 384, 96, 4, 2, 64, False, True, False, 0),
]


@hopper
@pytest.mark.parametrize("case", NORM_CASES, ids=lambda c: "x".join(map(str, c[:6])) + "-" + "".join(
    n for n, on in zip("pbr", c[6:9]) if on) + f"-tail{c[9]}")
def test_conv3d_k3_with_the_next_norm_matches_float64(case):
    """The next layer's RMS norm + SiLU in the epilogue: against the float64 convolution normalised in
    float64, the error at most 2x that of cuDNN's bf16 convolution normalised in float32 (the unfused path's
    numbers), plus a floor; the tail is the output's last frames, and nothing is written outside either."""
    from oasis.vae_kernels import norm_silu_reference

    b, cin, cout, t, h, w, has_prev, has_bias, has_res, k = case
    x, prev, weight, bias, residual, g = random_call(case)
    gamma = (1 + 0.5 * torch.randn(cout, 1, 1, 1, device="cuda", generator=g)).bfloat16()
    scale = cout ** 0.5

    big, out = framed(b, cout, t, h, w)
    big_tail, tail = framed(b, cout, max(k, 1), h, w)
    tail = tail if k else None
    vae_cuda.conv3d_k3(x, weight, bias, prev=prev, residual=residual, norm=(gamma, scale), tail=tail, out=out)
    torch.cuda.synchronize()
    for whole, size in ((big, t), (big_tail, k)):
        if size:
            assert torch.isnan(whole[:, :, 0]).all() and torch.isnan(whole[:, :, size + 1]).all(), "wrote outside"
    assert out.isfinite().all()
    if k:
        assert torch.equal(tail, out[:, :, t - k:]), "the tail is not the output's last frames"
    exact = norm_silu_reference(reference(x, weight, bias, prev, residual), gamma.double(), scale)
    cudnn = reference(x, weight, None if bias is None else bias.bfloat16(), prev, residual, torch.bfloat16)
    unfused = norm_silu_reference(cudnn.float(), gamma.float(), scale).bfloat16()
    err = (out.double() - exact).abs().max().item()
    base = (unfused.double() - exact).abs().max().item()
    assert err <= 2 * base + 1e-2, (err, base)


@hopper
def test_the_norm_needs_one_programs_channels():
    x = torch.zeros(1, 64, 2, 4, 64, dtype=torch.bfloat16, device="cuda").contiguous(
        memory_format=torch.channels_last_3d)
    w = torch.zeros(384, 64, 3, 3, 3, dtype=torch.bfloat16, device="cuda")
    assert vae_cuda.why_not(x, w) is None
    assert "needs 96 or 192 output channels, got 384" in vae_cuda.why_not(x, w, norm=True)
    with pytest.raises(ValueError, match="needs 96 or 192 output channels"):
        vae_cuda.conv3d_k3(x, w, norm=(torch.ones(384, device="cuda"), 1.0))


@pytest.fixture
def fused(monkeypatch):
    """``(conv1's output channels, whether its kernel applied norm2)`` of every residual block call."""
    from oasis.wan_vae import ResidualBlock

    calls = []
    conv2_input = ResidualBlock._conv2_input

    def spy(self, *args, **kwargs):
        got = conv2_input(self, *args, **kwargs)
        calls.append((self.conv1.out_channels, got is not None))
        return got

    monkeypatch.setattr(ResidualBlock, "_conv2_input", spy)
    return calls


@pytest.fixture
def ran(monkeypatch):
    """The output widths of every call of the CUDA convolution."""
    widths = []
    real = vae_cuda.conv3d_k3

    def spy(x, weight, *args, **kwargs):
        widths.append(weight.shape[0])
        return real(x, weight, *args, **kwargs)

    monkeypatch.setattr(vae_cuda, "conv3d_k3", spy)
    return widths


@hopper
@pytest.mark.parametrize("chunk,pieces", [(1, 2), (1, 1), (2, None)])
def test_decoder_with_the_cuda_kernel_matches_float64(chunk, pieces, fused, ran):
    """Wan2.1's decoder (its real channel counts: 96, 192, 384) on small latents: with conv_kernel="cuda" and
    "auto" its error against the float64 decode is at most 2x that of the cuDNN path (plus a floor); the
    192-channel residual blocks take the norm in conv1's epilogue; "auto" runs the kernel on 192 output
    channels only, "cuda" on more widths."""
    from oasis.wan_vae import WanVAE, WanVAEConfig

    torch.manual_seed(0)
    vae = WanVAE(WanVAEConfig(), encoder=False).cuda()
    z = torch.randn(1, 16, 3, 5, 7, device="cuda")
    with torch.no_grad():
        exact = vae.double().decode(z.double(), chunk=chunk, piece_frames=pieces)
        vae.to(torch.bfloat16).channels_last()
        got, widths = {}, {}
        for kernel in ("cudnn", "cuda", "auto"):
            vae.conv_kernel = kernel
            fused.clear()
            ran.clear()
            got[kernel] = vae.decode(z.bfloat16(), chunk=chunk, piece_frames=pieces).double()
            # up_blocks.2's (192 -> 192); up_blocks.3's conv1 read 96 channels, which cuDNN keeps, and 384 is two
            # tiles; "auto" runs the 192-wide ones only
            assert {c for c, on in fused if on} == (set() if kernel == "cudnn" else {192}), (kernel, fused)
            widths[kernel] = set(ran)
    assert widths["cudnn"] == set() and widths["auto"] == {192} and widths["cuda"] > {192}, widths
    err = {k: (v - exact).abs().max().item() for k, v in got.items()}
    for kernel in ("cuda", "auto"):
        assert got[kernel].isfinite().all()
        assert err[kernel] <= 2 * err["cudnn"] + 1e-2, err
        assert not torch.equal(got[kernel], got["cudnn"]), f"the CUDA kernel did not run under {kernel!r}"


@hopper
@pytest.mark.parametrize("chunk", [1, None])
def test_encoder_with_the_cuda_kernel_matches_float64(chunk, fused, ran):
    """Wan2.1's encoder (96, 192, 384 channels) on a small clip: with conv_kernel="cuda" and "auto" the
    posterior's mean is within 2x the cuDNN path's error against the float64 encode (plus a floor); its
    192-channel residual blocks take the norm in conv1's epilogue; "auto" runs the kernel on 192 output
    channels only."""
    from oasis.wan_vae import WanVAE, WanVAEConfig

    torch.manual_seed(0)
    vae = WanVAE(WanVAEConfig(), decoder=False).cuda()
    video = torch.rand(1, 3, 9, 40, 72, device="cuda") * 2 - 1
    with torch.no_grad():
        exact = vae.double().encode(video.double(), chunk=chunk)
        vae.to(torch.bfloat16).channels_last()
        got, widths = {}, {}
        for kernel in ("cudnn", "cuda", "auto"):
            vae.conv_kernel = kernel
            fused.clear()
            ran.clear()
            got[kernel] = vae.encode(video.bfloat16(), chunk=chunk).double()
            assert {c for c, on in fused if on} == (set() if kernel == "cudnn" else {192}), (kernel, fused)
            widths[kernel] = set(ran)
    assert widths["cudnn"] == set() and widths["auto"] == {192} and widths["cuda"] > {192}, widths
    err = {k: (v - exact).abs().max().item() for k, v in got.items()}
    for kernel in ("cuda", "auto"):
        assert got[kernel].isfinite().all()
        assert err[kernel] <= 2 * err["cudnn"] + 1e-2, err
        assert not torch.equal(got[kernel], got["cudnn"]), f"the CUDA kernel did not run under {kernel!r}"


def test_conv_kernel_setting_is_checked():
    from oasis.wan_vae import WanVAE, WanVAEConfig

    vae = WanVAE(WanVAEConfig(base_dim=8, dim_mult=(1, 2), num_res_blocks=1, temperal_downsample=(True,)),
                 encoder=False)
    vae.conv_kernel = "triton"
    with pytest.raises(ValueError, match="conv_kernel must be one of 'auto', 'cudnn', 'cuda', got 'triton'"):
        vae.decode(torch.zeros(1, 16, 2, 4, 4))


def test_cuda_kernel_takes_nothing_outside_its_setting_or_on_the_cpu():
    from oasis import vae_conv

    x = torch.zeros(1, 192, 2, 4, 64, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
    w = torch.zeros(192, 192, 3, 3, 3, dtype=torch.bfloat16)
    assert not vae_conv.cuda_kernel_takes(x, w, 2)
    with vae_conv.cuda_kernel():
        assert not vae_conv.cuda_kernel_takes(x, w, 2)  # the CPU
    if torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0):
        xc, wc = x.cuda(), w.cuda()
        assert not vae_conv.cuda_kernel_takes(xc, wc, 2)
        with vae_conv.cuda_kernel(widths=(96,)):
            assert not vae_conv.cuda_kernel_takes(xc, wc, 2)  # 192 output channels: not one of its widths
        with vae_conv.cuda_kernel(widths=vae_conv.AUTO_CUDA_WIDTHS):
            assert vae_conv.cuda_kernel_takes(xc, wc, 2)
        with vae_conv.cuda_kernel():
            assert vae_conv.cuda_kernel_takes(xc, wc, 2)
            assert not vae_conv.cuda_kernel_takes(xc, wc, 0)  # no cached frames: not this kernel's call
            assert not vae_conv.cuda_kernel_takes(xc, wc, 2, residual=xc.contiguous())  # channels-first


def test_cuda_kernel_widths_select_by_output_channels(monkeypatch):
    """``cuda_kernel(widths=...)`` hands the kernel only the calls of those output widths (the rest of its rule
    stood in for, as the CPU cannot run it), and bad widths are a clear error."""
    from oasis import vae_conv

    monkeypatch.setattr(vae_cuda, "why_not", lambda *a, **k: None)
    x = torch.zeros(1, 192, 2, 4, 8, dtype=torch.bfloat16, device="meta")
    w = {c: torch.zeros(c, 192, 3, 3, 3, dtype=torch.bfloat16, device="meta") for c in (96, 192, 384)}
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    with vae_conv.cuda_kernel():
        assert all(vae_conv.cuda_kernel_takes(x, w[c], 2) for c in w)
    with vae_conv.cuda_kernel(widths=vae_conv.AUTO_CUDA_WIDTHS):
        assert {c for c in w if vae_conv.cuda_kernel_takes(x, w[c], 2)} == set(vae_conv.AUTO_CUDA_WIDTHS) == {192}
    with vae_conv.cuda_kernel(False, widths=(192,)):
        assert not vae_conv.cuda_kernel_takes(x, w[192], 2)
    import numpy as np

    with vae_conv.cuda_kernel(widths=[np.int64(192)]):
        assert vae_conv.cuda_kernel_takes(x, w[192], 2) and not vae_conv.cuda_kernel_takes(x, w[384], 2)
    for bad in ((), (0,), (True,), ("192",), 192, "192", (192.0,)):
        with pytest.raises(ValueError, match="widths must be positive channel counts or None, got"):
            with vae_conv.cuda_kernel(widths=bad):
                pass
    with pytest.raises(ValueError, match="enabled must be True or False, got 'cudnn'"):
        with vae_conv.cuda_kernel("cudnn"):
            pass


@pytest.mark.parametrize("width,sums_first", [(16, True), (32, False)])
def test_a_block_left_on_cudnn_keeps_the_pending_sum(width, sums_first, monkeypatch):
    """A residual block handed a :class:`PendingSum` sums it in a pass of its own only where the CUDA kernel takes
    its conv1 (here, as in "auto", by its width: 16 of 16 and 32); a block left on cuDNN leaves the sum to norm1's
    pass. Either way the output is the summed input's (the kernel stood in for by its contract on the CPU)."""
    from oasis import vae_conv
    from oasis.wan_vae import PendingSum, ResidualBlock

    def takes(x, weight, time_pad, *, prev=None, residual=None, norm=False):  # the CPU stand-in of the real rule
        on = vae_conv._CUDA_K3.get()
        return bool(on) and time_pad == 2 and (on is True or weight.shape[0] in on) and not norm

    monkeypatch.setattr(vae_conv, "cuda_kernel_takes", takes)
    monkeypatch.setattr(vae_cuda, "conv3d_k3", vae_cuda.conv3d_k3_reference)
    summed = []
    real = PendingSum.tensor
    monkeypatch.setattr(PendingSum, "tensor", lambda self: summed.append(self.conv.shape[1]) or real(self))
    torch.manual_seed(width)
    block = ResidualBlock(width, width).double()
    conv, res = torch.randn(2, 1, width, 3, 4, 5, dtype=torch.float64)
    bias = torch.randn(width, dtype=torch.float64)
    want = block(conv + bias.view(-1, 1, 1, 1) + res, {})
    with vae_conv.cuda_kernel(widths=(16,)):
        got = block(PendingSum(conv.clone(), bias, res), {})
    assert summed == ([width] if sums_first else [])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("cin,cout", [(96, 96), (192, 96), (96, 192), (384, 192)])
@pytest.mark.parametrize("pieces", [(1, 1, 1), (3, 1, 2), (2,), (1, 4)])
def test_residual_block_with_the_norm_in_conv1_keeps_the_same_cache(cin, cout, pieces, monkeypatch):
    """A residual block whose conv1 applies norm2 in its epilogue (``_conv2_input``; the kernel stood in for by
    its contract in float64 on the CPU, vae_cuda.conv3d_k3_reference) gives the unfused path's output, and the same cache entries for conv1
    and conv2 after every call: frames handed over one or several at a time, fewer than the cache holds too."""
    from oasis import vae_conv
    from oasis.wan_vae import ResidualBlock

    torch.manual_seed(cin + cout + len(pieces))
    block = ResidualBlock(cin, cout).double()
    for norm in (block.norm1, block.norm2):
        norm.gamma.data.uniform_(0.5, 1.5)
    frames = torch.randn(1, cin, sum(pieces), 3, 5, dtype=torch.float64)
    runs = {}
    for fused in (False, True):
        with monkeypatch.context() as m:
            if fused:
                m.setattr(vae_conv, "cuda_kernel_takes", lambda x, w, tp, *, prev=None, residual=None, norm=False:
                          tp == 2 and (not norm or w.shape[0] in vae_cuda.NORM_CHANNELS))
                m.setattr(vae_cuda, "conv3d_k3", vae_cuda.conv3d_k3_reference)
            cache, outs, entries, t = {}, [], [], 0
            for n in pieces:
                outs.append(block(frames[:, :, t:t + n], cache))
                entries.append([cache[block.conv1].clone(), cache[block.conv2].clone()])
                t += n
        runs[fused] = outs, entries
    for a, b in zip(runs[False][0], runs[True][0]):
        torch.testing.assert_close(b, a)
    for a, b in zip(runs[False][1], runs[True][1]):
        torch.testing.assert_close(b[0], a[0])
        torch.testing.assert_close(b[1], a[1])


# ---------------------------------------------------------------------------------------------------------
# The output convolution (conv3d_few_out): 1 to 5 output channels, a row's three horizontal taps as N
# ---------------------------------------------------------------------------------------------------------

def few_out_emulated(x, weight, bias=None, prev=None):
    """What ``conv3d_few_out`` computes, as its programs do, in float64 on the CPU: the B fragments read back
    from :func:`oasis.vae_cuda.pack_few_out_weight` by PTX's m16n8k16 layout (lane ``l``, register ``r``, half
    ``e``: row ``2 (l % 4) + e + 8 r``, column ``8 tile + l // 4``), then per tile of 4 output rows and 126
    output pixels the sums Q over the input tile (128 pixels from one left of the tile, zero outside the frame)
    and ``y = bias + sum_dx Q[w + dx][dx Cout + o]``."""
    cout, cin = weight.shape[:2]
    packed = vae_cuda.pack_few_out_weight(weight).double()  # [3, 3, Cin / 16, 2, 32, 4]
    cols = torch.zeros(3, 3, cin, 16, dtype=torch.float64)
    for lane in range(32):
        for r in range(2):
            for e in range(2):
                k = 2 * (lane % 4) + e + 8 * r
                for tile in range(2):
                    n = 8 * tile + lane // 4
                    cols[:, :, k::16, n] = packed[:, :, :, tile, lane, 2 * r + e]
    b, _, t, h, w = x.shape
    front = prev if prev is not None else x.new_zeros(b, cin, 2, h, w)
    frames = torch.cat([front, x], 2).double().permute(0, 2, 3, 4, 1)  # [B, T + 2, H, W, C]
    rows, out_w, pix = 4, 126, 128
    y = torch.zeros(b, cout, t, h, w, dtype=torch.float64)
    for y0 in range(0, h, rows):
        for x0 in range(0, w, out_w):
            tile_in = torch.zeros(b, t + 2, rows + 2, pix, cin, dtype=torch.float64)
            ys, xs = range(max(y0 - 1, 0), min(y0 - 1 + rows + 2, h)), range(max(x0 - 1, 0), min(x0 - 1 + pix, w))
            tile_in[:, :, ys.start - (y0 - 1):ys.stop - (y0 - 1), xs.start - (x0 - 1):xs.stop - (x0 - 1)] = \
                frames[:, :, ys.start:ys.stop, xs.start:xs.stop]
            q = torch.zeros(b, t, rows, pix, 16, dtype=torch.float64)
            for dt in range(3):
                for dy in range(3):
                    q += torch.einsum("btrpc,cn->btrpn", tile_in[:, dt:dt + t, dy:dy + rows], cols[dt, dy])
            for dx in range(3):
                part = q[:, :, :, dx:dx + out_w, dx * cout:(dx + 1) * cout]  # [B, T, rows, 126, Cout]
                hh, ww = min(rows, h - y0), min(out_w, w - x0)
                y[:, :, :, y0:y0 + hh, x0:x0 + ww] += part[:, :, :hh, :ww].permute(0, 4, 1, 2, 3)
    if bias is not None:
        y += bias.double().view(1, -1, 1, 1, 1)
    return y


@pytest.mark.parametrize("cin,cout,t,h,w,has_prev", [(96, 3, 2, 5, 130, True), (16, 5, 1, 4, 7, False),
                                                     (32, 1, 3, 9, 253, True)])
def test_few_out_fragment_order_and_taps_give_the_convolution(cin, cout, t, h, w, has_prev):
    """The packed weight read back by the MMA's B layout, and the kernel's sums (taps as columns, the shift by
    dx at the end, 126-pixel tiles with a pixel of halo either side), give the float64 convolution."""
    g = torch.Generator().manual_seed(cin * cout + w)
    x = torch.randn(1, cin, t, h, w, generator=g, dtype=torch.float64)
    prev = torch.randn(1, cin, 2, h, w, generator=g, dtype=torch.float64) if has_prev else None
    weight = torch.randn(cout, cin, 3, 3, 3, generator=g, dtype=torch.float64)
    weight = weight.bfloat16().double()  # the packing rounds to bf16: compare on values it keeps
    bias = torch.randn(cout, generator=g, dtype=torch.float64)
    want = vae_cuda.conv3d_k3_reference(x, weight, bias, prev=prev)
    got = few_out_emulated(x, weight, bias, prev)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-9)


def test_few_out_weight_is_kept_and_zero_past_its_columns():
    w = torch.randn(3, 32, 3, 3, 3)
    p = vae_cuda.pack_few_out_weight(w)
    assert p.shape == (3, 3, 2, 2, 32, 4) and p.dtype == torch.bfloat16 and p.is_contiguous()
    assert vae_cuda.pack_few_out_weight(w) is p
    # column n = 8 tile + lane // 4 >= 9 is padding: tile 1, lanes 4 .. 31
    assert (p[:, :, :, 1, 4:] == 0).all() and (p[:, :, :, 1, :4] != 0).any()
    # lane 5, register 1, half 0 of (dt 2, dy 1, chunk 1, tile 0): row 2 + 8 = 10 of the chunk (channel 26),
    # column 1: dx 0, o 1
    assert p[2, 1, 1, 0, 5, 2] == w[1, 26, 2, 1, 0].bfloat16()
    w.add_(1)
    assert vae_cuda.pack_few_out_weight(w) is not p


def test_few_out_why_not_names_the_reason_on_the_cpu():
    from oasis import vae_conv

    x = torch.zeros(1, 96, 2, 4, 8, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
    w = torch.zeros(3, 96, 3, 3, 3, dtype=torch.bfloat16)
    assert "not a CUDA device" in vae_cuda.few_out_why_not(x, w)
    assert not vae_conv.few_out_kernel_takes(x, w, 2)
    with pytest.raises(ValueError, match="conv3d_few_out does not take this call: x is on cpu"):
        vae_cuda.conv3d_few_out(x, w)


@pytest.mark.parametrize("pieces", [(1, 1, 1), (3, 1, 2), (2, 4)])
def test_output_convolution_on_the_few_out_path_keeps_the_same_cache(pieces, monkeypatch):
    """The decoder's output convolution where the few-output kernel takes it (the kernel stood in for by its
    float64 contract on the CPU): the normalised frames apart from the cached ones, the same output and
    cache entry as the cuDNN path after every call, frames handed one or several at a time."""
    from oasis import vae_conv
    from oasis.wan_vae import CausalConv3d, RMSNorm

    torch.manual_seed(len(pieces))
    conv = CausalConv3d(96, 3, 3, padding=1).double()
    norm = RMSNorm(96).double()
    norm.gamma.data.uniform_(0.5, 1.5)
    frames = torch.randn(1, 96, sum(pieces), 3, 5, dtype=torch.float64)
    runs = {}
    for few in (False, True):
        taken = []
        with monkeypatch.context() as m:
            if few:
                def takes(x, w, tp, *, prev=None):
                    taken.append(prev is None)
                    return tp == 2 and w.shape[0] <= 5

                m.setattr(vae_conv, "few_out_kernel_takes", takes)
                m.setattr(vae_cuda, "conv3d_few_out", lambda x, w, b=None, *, prev=None, out=None:
                          vae_cuda.conv3d_k3_reference(x, w, b, prev=prev, out=out))
            cache, outs, entries, t = {}, [], [], 0
            for n in pieces:
                outs.append(conv.forward_normed(frames[:, :, t:t + n], norm, cache))
                entries.append(cache[conv].clone())
                t += n
        runs[few] = outs, entries
        if few:
            assert taken == [True] + [False] * (len(pieces) - 1), taken  # zeros first, then the cache
    for a, b in zip(*(runs[k][0] for k in (False, True))):
        torch.testing.assert_close(b, a)
    for a, b in zip(*(runs[k][1] for k in (False, True))):
        torch.testing.assert_close(b, a)


# (B, Cin, Cout, T, H, W, prev, bias): the decoder's 96 -> 3, widths no 126-pixel tile divides (and one
# smaller than a tile), heights no 4-row tile divides, T = 1, other channel counts
FEW_OUT_CASES = [
    (1, 96, 3, 2, 9, 130, True, True),
    (2, 96, 3, 1, 5, 126, False, True),
    (1, 16, 1, 3, 4, 7, True, False),
    (1, 160, 5, 2, 3, 253, True, True),
    (1, 96, 3, 4, 1, 1, False, False),
    (2, 32, 4, 2, 6, 127, True, True),
]


@hopper
@pytest.mark.parametrize("case", FEW_OUT_CASES, ids=lambda c: "x".join(map(str, c[:6])) + "-" + "".join(
    n for n, on in zip("pb", c[6:]) if on))
def test_conv3d_few_out_matches_float64(case):
    b, cin, cout, t, h, w, has_prev, has_bias = case
    x, prev, weight, bias, _, g = random_call((*case, False))
    # x as a view of frames inside a larger buffer (its frame stride is not its dense one)
    outer = torch.randn(b, cin, t + 3, h, w, device="cuda", generator=g).bfloat16().contiguous(
        memory_format=torch.channels_last_3d)
    outer[:, :, 1:1 + t] = x
    x = outer[:, :, 1:1 + t]
    big, out = framed(b, cout, t, h, w)
    vae_cuda.conv3d_few_out(x, weight, bias, prev=prev, out=out)
    torch.cuda.synchronize()
    assert torch.isnan(big[:, :, 0]).all() and torch.isnan(big[:, :, t + 1]).all(), "wrote outside its output"
    assert out.isfinite().all()
    exact = reference(x, weight, bias, prev)
    cudnn = reference(x, weight, None if bias is None else bias.bfloat16(), prev, None, torch.bfloat16)
    err = (out.double() - exact).abs().max().item()
    base = (cudnn.double() - exact).abs().max().item()
    assert err <= 2 * base + 1e-2, (err, base)
    # a channels-first output gets the same values
    first = vae_cuda.conv3d_few_out(x, weight, bias, prev=prev, out=torch.empty(b, cout, t, h, w, device="cuda",
                                                                                dtype=torch.bfloat16))
    assert torch.equal(first, out)


@hopper
def test_few_out_why_not_on_the_gpu():
    x = torch.zeros(1, 96, 2, 4, 8, dtype=torch.bfloat16, device="cuda").contiguous(
        memory_format=torch.channels_last_3d)
    w = torch.zeros(3, 96, 3, 3, 3, dtype=torch.bfloat16, device="cuda")
    assert vae_cuda.few_out_why_not(x, w) is None
    assert "1 to 5 output channels (got 6)" in vae_cuda.few_out_why_not(x, w.new_zeros(6, 96, 3, 3, 3))
    assert "a multiple of 16" in vae_cuda.few_out_why_not(x[:, :8], w[:, :8])
    # the same strides from a start 2 bytes past 16-byte alignment
    odd = torch.zeros(x.numel() + 1, dtype=torch.bfloat16, device="cuda")[1:].as_strided(x.shape, x.stride())
    assert "16-byte aligned" in vae_cuda.few_out_why_not(odd, w)
    assert "x is empty" in vae_cuda.few_out_why_not(x[:, :, :0], w)
    assert "channels-last" in vae_cuda.few_out_why_not(x.contiguous(), w)
    assert "prev must be" in vae_cuda.few_out_why_not(x, w, prev=x[:, :, :1])


@hopper
@pytest.mark.parametrize("chunk,pieces", [(1, 2), (2, None)])
def test_decoder_with_the_few_out_kernel_matches_float64(chunk, pieces, monkeypatch):
    """Wan2.1's decoder on small latents: its output convolution on the few-output kernel (every call of it),
    the error against the float64 decode at most 2x that of the cuDNN path's (plus a floor)."""
    from oasis import vae_conv
    from oasis.wan_vae import WanVAE, WanVAEConfig

    torch.manual_seed(0)
    vae = WanVAE(WanVAEConfig(), encoder=False).cuda()
    z = torch.randn(1, 16, 3, 5, 17, device="cuda")  # 136 pixels wide: two tiles
    calls = []
    takes = vae_conv.few_out_kernel_takes

    def spy(x, weight, *args, **kwargs):
        got = takes(x, weight, *args, **kwargs)
        if weight.shape[0] <= 5:  # the output convolution; the others are asked too
            calls.append(got)
        return got

    with torch.no_grad():
        exact = vae.double().decode(z.double(), chunk=chunk, piece_frames=pieces)
        vae.to(torch.bfloat16).channels_last()
        with monkeypatch.context() as m:
            m.setattr(vae_conv, "few_out_kernel_takes", lambda *a, **k: False)
            cudnn = vae.decode(z.bfloat16(), chunk=chunk, piece_frames=pieces).double()
        monkeypatch.setattr(vae_conv, "few_out_kernel_takes", spy)
        got = vae.decode(z.bfloat16(), chunk=chunk, piece_frames=pieces).double()
    assert calls and all(calls), calls
    assert got.isfinite().all()
    err, base = (got - exact).abs().max().item(), (cudnn - exact).abs().max().item()
    assert err <= 2 * base + 1e-2, (err, base)


def test_library_takes_setup_s_build_first_and_says_why_it_does_not_load(monkeypatch):
    """Where setup.py built ``oasis._vae_conv``, that library is loaded, not a JIT build; one that does not load
    (built for another torch) is a reason, not an exception."""
    import importlib.machinery

    if hasattr(torch.ops, "oasis_vae") and hasattr(torch.ops.oasis_vae, "conv3d_k3"):
        pytest.skip("the ops are registered in this process")
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "13.0")
    spec = importlib.machinery.ModuleSpec("oasis._vae_conv", None, origin="/nonexistent/_vae_conv.so")
    find = vae_cuda.importlib.util.find_spec
    monkeypatch.setattr(vae_cuda.importlib.util, "find_spec", lambda name, *a: spec if name == "oasis._vae_conv"
                        else find(name, *a))
    vae_cuda.library.cache_clear()
    try:
        loaded, why = vae_cuda.library()
    finally:
        vae_cuda.library.cache_clear()
    assert not loaded and why.startswith("/nonexistent/_vae_conv.so does not load"), why
