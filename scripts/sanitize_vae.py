"""The VAE's CUDA kernels (csrc/vae_conv/) on small, awkward calls, for compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python scripts/sanitize_vae.py
    compute-sanitizer --tool racecheck python scripts/sanitize_vae.py --kernels-only

Without the caching allocator each tensor is an allocation of its own, so a read or write past a tensor's end is
an error memcheck reports rather than a touch of its neighbour in a pooled block. Covers ``conv3d_k3`` (the VAE's
geometries, 192 -> 192, 192 -> 384 and 384 -> 384, and others it takes: 384 -> 192, 192 -> 96, 64 -> 96; with and
without the cached frames, bias and residual; the next layer's norm with the cache tail at 96 and 192 output
channels; widths no 64-pixel segment divides, one to three frames), ``conv3d_few_out``, ``norm_silu`` (each option,
a time slice of a larger buffer), then Wan2.1's VAE at its own channel widths, random weights, decoding latents
``[3, 5, 7]`` (chunks of one latent frame, 2-frame pieces) and encoding a 9-frame 40x56 clip (chunks of one) under
``conv_kernel="cuda"`` and ``"auto"``, each kernel's calls there counted (none: an error, the sanitizer would have
checked nothing). Needs a Hopper GPU and the extension (built on first use).
"""

from __future__ import annotations

import argparse
import itertools

import torch

from oasis import WanVAE, WanVAEConfig, vae_cuda


def _rnd(g, *shape):
    return torch.randn(*shape, device="cuda", generator=g).bfloat16().contiguous(memory_format=torch.channels_last_3d)


def conv_calls(g) -> int:
    n = 0
    # (Cin, Cout, T, H, W): the decoder's and encoder's geometries at odd sizes
    for cin, cout, t, h, w in ((192, 192, 2, 5, 13), (192, 384, 3, 3, 33), (384, 384, 2, 2, 65), (384, 192, 1, 3, 70),
                               (192, 96, 3, 4, 9), (64, 96, 1, 1, 129)):
        weight = (torch.randn(cout, cin, 3, 3, 3, device="cuda", generator=g) * (27 * cin) ** -0.5).bfloat16()
        for has_prev, has_bias, has_res in itertools.product((False, True), repeat=3):
            x = _rnd(g, 1, cin, t, h, w)
            prev = _rnd(g, 1, cin, 2, h, w) if has_prev else None
            bias = torch.randn(cout, device="cuda", generator=g) if has_bias else None
            res = _rnd(g, 1, cout, t, h, w) if has_res else None
            out = vae_cuda.conv3d_k3(x, weight, bias, prev=prev, residual=res)
            n += 1
            if cout in (96, 192) and not has_res:  # the next layer's norm in the epilogue, with the cache tail
                gamma = torch.rand(cout, device="cuda", generator=g).bfloat16() + 0.5
                tail = _rnd(g, 1, cout, min(2, t), h, w)
                normed = vae_cuda.conv3d_k3(x, weight, bias, prev=prev, norm=(gamma, cout ** 0.5), tail=tail)
                assert torch.equal(tail, normed[:, :, -tail.shape[2]:])
                n += 1
            assert out.isfinite().all()
    return n


def few_out_calls(g) -> int:
    n = 0
    for cin, cout, t, h, w, has_prev in ((96, 3, 2, 5, 130, True), (96, 3, 1, 3, 7, False), (16, 5, 3, 4, 9, True)):
        weight = (torch.randn(cout, cin, 3, 3, 3, device="cuda", generator=g) * (27 * cin) ** -0.5).bfloat16()
        x = _rnd(g, 1, cin, t, h, w)
        prev = _rnd(g, 1, cin, 2, h, w) if has_prev else None
        out = vae_cuda.conv3d_few_out(x, weight, torch.randn(cout, device="cuda", generator=g), prev=prev)
        assert out.isfinite().all()
        n += 1
    return n


def norm_calls(g) -> int:
    n = 0
    for c, (t, h, w) in itertools.product((96, 192, 384), ((1, 3, 5), (3, 7, 9))):
        gamma = torch.rand(c, device="cuda", generator=g).bfloat16() + 0.5
        for has_bias, has_res, has_tail, silu in itertools.product((False, True), repeat=4):
            x = _rnd(g, 2, c, t, h, w)
            out = torch.empty_like(x)
            res = _rnd(g, 2, c, t, h, w) if has_res else None
            sum_out = torch.empty_like(x) if has_res else None
            tail = _rnd(g, 2, c, 1, h, w) if has_tail else None
            bias = torch.randn(c, device="cuda", generator=g) if has_bias else None
            vae_cuda.norm_silu(x, gamma, c ** 0.5, out=out, silu=silu, bias=bias, tail=tail, residual=res,
                               sum_out=sum_out)
            n += 1
        # a time slice of a larger buffer (the VAE writes behind the cached frames)
        buf = _rnd(g, 1, c, t + 2, h, w)
        vae_cuda.norm_silu(_rnd(g, 1, c, t, h, w), gamma, c ** 0.5, out=buf[:, :, 2:])
        n += 1
    return n


def vae_calls(g) -> int:
    vae = WanVAE(WanVAEConfig()).to("cuda").eval().requires_grad_(False).to(torch.bfloat16).channels_last(True)
    z = torch.randn(1, 16, 3, 5, 7, device="cuda", generator=g).bfloat16()
    clip = torch.rand(1, 3, 9, 40, 56, device="cuda", generator=g).bfloat16() * 2 - 1
    counts = {}

    def counted(name, fn):
        def call(*args, **kwargs):
            key = f"{name} with the norm" if kwargs.get("norm") is not None else name
            counts[key] = counts.get(key, 0) + 1
            return fn(*args, **kwargs)
        return call

    # the VAE reaches the kernels through these module functions (oasis.wan_vae, oasis.vae_kernels)
    real = {name: getattr(vae_cuda, name) for name in ("conv3d_k3", "conv3d_few_out", "_norm_silu_checked")}
    n = 0
    try:
        for name, fn in real.items():
            setattr(vae_cuda, name, counted(name, fn))
        with torch.no_grad():
            for kernel in ("cuda", "auto"):
                vae.conv_kernel = kernel
                counts.clear()
                video = vae.decode(z, chunk=1, piece_frames=2)
                latents = vae.encode(clip, chunk=1)
                assert video.isfinite().all() and latents.isfinite().all()
                print(f"  conv_kernel={kernel!r}: {dict(sorted(counts.items()))}", flush=True)
                missing = [k for k in ("conv3d_k3", "conv3d_k3 with the norm", "conv3d_few_out", "_norm_silu_checked")
                           if not counts.get(k)]
                if missing:
                    raise SystemExit(f"conv_kernel={kernel!r}: the VAE called none of {missing}")
                n += 2
    finally:
        for name, fn in real.items():
            setattr(vae_cuda, name, fn)
    return n


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels-only", action="store_true", help="the kernels' own calls, not the VAE's decode/encode")
    args = p.parse_args(argv)
    ok, how = vae_cuda.library()
    if not ok:
        raise SystemExit(f"the VAE's CUDA kernels are not available: {how}")
    g = torch.Generator(device="cuda").manual_seed(0)
    parts = [conv_calls, few_out_calls, norm_calls] + ([] if args.kernels_only else [vae_calls])
    for part in parts:
        n = part(g)
        torch.cuda.synchronize()
        print(f"{part.__name__}: {n} calls ok", flush=True)


if __name__ == "__main__":
    main()
