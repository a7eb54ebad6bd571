"""The VAE's norm pass in CUDA (csrc/vae_conv/norm_silu.cu, oasis.vae_cuda.norm_silu): its predicate on the CPU; on a
Hopper GPU, parity with the float64 expression under FlashAttention's rule (error at most 2x that of the torch
expression in the input dtype, plus a floor), every option (bias, residual and its stored sum, the cache tail, SiLU
off, float16, two videos, time slices of a larger buffer), nothing written outside its outputs, and the pass the VAE
runs (oasis.vae_kernels.norm_silu) taking it."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch

from oasis import vae_cuda, vae_kernels

hopper = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)),
                            reason="needs a Hopper GPU (sm_90a)")


@pytest.mark.parametrize("channels, ok", [(24, True), (48, True), (96, True), (192, True), (384, True), (768, True),
                                          (12, False), (72, False), (120, False), (1536, False), (0, False)])
def test_norm_channels_rule(channels, ok):
    why = vae_cuda.norm_channels_why_not(channels)
    assert (why is None) == ok, why
    if not ok:
        assert str(channels) in why


def test_norm_why_not_names_the_reason_on_the_cpu():
    x = torch.zeros(1, 96, 2, 4, 4, dtype=torch.bfloat16)
    assert "not a CUDA device" in vae_cuda.norm_why_not(x)
    with pytest.raises(ValueError, match="does not take this call"):
        vae_cuda.norm_silu(x, torch.ones(96), 1.0, out=torch.empty_like(x))


@pytest.mark.slow  # ~13 s of nvcc on 2 cores
def test_the_pass_compiles_for_sm90a_without_spills():
    """Every instance (bf16 and fp16, each option on or off, the sum only with a residual) within two blocks of 8 warps
    an SM (``__launch_bounds__(256, 2)``: at most 128 registers), without spills."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc on this machine")
    proc = subprocess.run([nvcc, *vae_cuda.NVCC_FLAGS, "-Xptxas", "-v", "-c", str(vae_cuda.SOURCES / "norm_silu.cu"),
                           "-o", "/dev/null"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    entries = re.findall(r"Compiling entry function '(\w+)' for 'sm_90a'\n(.*?)(?=ptxas info\s+: Compiling|\Z)",
                         proc.stderr, flags=re.S)
    assert len(entries) == 48 and all("norm_silu_kernel" in n for n, _ in entries), [n for n, _ in entries]
    for name, body in entries:
        assert int(re.search(r"Used (\d+) registers", body).group(1)) <= 128, (name, body)
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", body)
        assert spill and spill.groups() == ("0", "0"), (name, body)


def _reference(x, gamma, scale, bias, residual, silu, dtype):
    """The pass's math in ``dtype`` (float64: the reference; x's dtype: the rule's yardstick): the residual sum
    rounded to x's dtype first, as the pass stores it."""
    if residual is not None:
        y = x.float() if bias is None else x.float() + bias.float().reshape(-1, 1, 1, 1)
        y = (y + residual.float()).to(x.dtype)
        return vae_kernels.norm_silu_reference(y.to(dtype), gamma.to(dtype), scale, silu), y
    return vae_kernels.norm_silu_reference(x.to(dtype), gamma.to(dtype), scale, silu,
                                           None if bias is None else bias.to(dtype)), None


def _framed(b, c, frames, h, w, dtype):
    """A channels-last ``[b, c, frames, h, w]`` between NaN frames (what the pass writes past it is caught)."""
    big = torch.full((b, c, frames + 2, h, w), float("nan"), device="cuda", dtype=dtype)
    big = big.contiguous(memory_format=torch.channels_last_3d)
    return big, big[:, :, 1:1 + frames]


# (B, C, T, H, W, dtype, bias, residual, sum, tail frames, SiLU): the VAE's widths and the rule's ends (24: a lane a
# position; 768: a warp a position), position counts no unit of 96 vectors divides
CASES = [
    (1, 96, 2, 9, 70, torch.bfloat16, True, False, False, 2, True),
    (2, 96, 3, 5, 7, torch.bfloat16, True, True, True, 1, True),
    (1, 192, 1, 13, 11, torch.bfloat16, False, True, False, 0, True),
    (2, 384, 2, 3, 50, torch.bfloat16, True, False, False, 2, False),
    (1, 24, 5, 7, 3, torch.float16, True, True, False, 2, True),
    (1, 768, 1, 2, 3, torch.bfloat16, True, False, False, 1, True),
    (1, 48, 4, 1, 1, torch.float16, False, False, False, 0, False),
]


@hopper
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"-{str(c[5])[6:]}-" + "".join(
    n for n, on in zip("brs", c[6:9]) if on) + f"-tail{c[9]}" + ("-silu" if c[10] else ""))
def test_cuda_norm_matches_float64(case):
    b, c, t, h, w, dtype, has_bias, has_res, has_sum, k, silu = case
    g = torch.Generator(device="cuda").manual_seed(hash(case[:5]) % 2**31)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * s).to(dtype)

    x = rnd(b, c, t, h, w, s=3.0).contiguous(memory_format=torch.channels_last_3d)
    x[0, :, 0, 0, 0] = 0  # a zero vector: eps keeps it zero, no NaN
    gamma = torch.rand(c, generator=g, device="cuda").to(dtype) + 0.5
    bias = torch.randn(c, generator=g, device="cuda") if has_bias else None
    residual = rnd(b, c, t, h, w).contiguous(memory_format=torch.channels_last_3d) if has_res else None
    x_in = x.clone()
    big, out = _framed(b, c, t, h, w, dtype)
    tail_big, tail = _framed(b, c, k, h, w, dtype) if k else (None, None)
    sum_out = x if has_sum else None  # the residual block's sum written over x itself
    scale = c ** 0.5
    got = vae_cuda.norm_silu(x, gamma, scale, out=out, silu=silu, bias=bias, tail=tail, residual=residual,
                             sum_out=sum_out)
    torch.cuda.synchronize()
    assert got.data_ptr() == out.data_ptr()
    assert big[:, :, 0].isnan().all() and big[:, :, t + 1].isnan().all(), "wrote outside its output"
    assert out.isfinite().all()
    if not has_res:
        assert out[0, :, 0, 0, 0].abs().max() == 0 or bias is not None
    # with a residual the sum is rounded to the dtype first, as its own pass stores it
    exact, summed = _reference(x_in if has_res else x_in.double(), gamma, scale, bias, residual, silu, torch.float64)
    if has_sum:
        assert torch.equal(x, summed)
    plain, _ = _reference(x_in, gamma, scale, bias, residual, silu, dtype)
    err = (out.double() - exact).abs().max().item()
    base = (plain.double() - exact).abs().max().item()
    assert err <= 2 * base + 1e-3, (err, base)
    if k:
        assert tail_big[:, :, 0].isnan().all() and tail_big[:, :, k + 1].isnan().all(), "wrote outside its tail"
        assert torch.equal(tail, out[:, :, t - k:])


@hopper
def test_the_vae_pass_takes_the_cuda_kernel_and_declines_what_it_cannot(monkeypatch):
    """oasis.vae_kernels.norm_silu runs the CUDA pass for channels-last 16-bit calls (its numbers within the rule of
    the Triton pass's), and Triton's for the rest (channels-first, 12 channels), with the same results."""
    g = torch.Generator(device="cuda").manual_seed(5)
    x = (torch.randn(1, 96, 3, 8, 12, generator=g, device="cuda") * 2).bfloat16()
    gamma = torch.rand(96, generator=g, device="cuda").bfloat16() + 0.5
    last = x.contiguous(memory_format=torch.channels_last_3d)
    assert vae_cuda.norm_why_not(last) is None
    assert "channels-last" in vae_cuda.norm_why_not(x)
    assert "24 * 2**k" in vae_cuda.norm_why_not(last[:, :12])
    calls = []
    real = vae_cuda._norm_silu_checked

    def spy(x, *args, **kwargs):
        calls.append(x.shape)
        return real(x, *args, **kwargs)

    monkeypatch.setattr(vae_cuda, "_norm_silu_checked", spy)
    ours = vae_kernels.norm_silu(last, gamma, 96 ** 0.5)
    first = vae_kernels.norm_silu(x, gamma, 96 ** 0.5)
    assert calls == [last.shape]
    triton_out = vae_kernels.norm_silu_triton(last, gamma, 96 ** 0.5)
    torch.testing.assert_close(ours, triton_out, rtol=0.02, atol=0.02)
    torch.testing.assert_close(first, triton_out, rtol=0.02, atol=0.02)
