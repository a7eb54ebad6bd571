"""Live tensor bytes over time during WanVAE.decode on the CPU, and what is live at the peak.

    python scripts/vae_peak.py --piece 2 [--latent 9 12 20] [--dtype bf16] [--kernel auto|cudnn|cuda] [--json out.json]

(~1 minute at the default latents on 2 cores; the figures do not depend on the latent size beyond
the area scaling, docs/PERF.md entry 18e).

A TorchDispatchMode sees every aten op of the decode; each op's outputs whose storage is new are
recorded (storage nbytes, shape, dtype, where in oasis/ it was allocated, which decoder stage, chunk and
piece were running). A storage is dropped from the live set when its StorageWeakRef expires (checked
before every op, so views sharing a storage count once and frees between ops are seen before the next
allocation). The weights and the input are counted as a fixed base.

To mimic the GPU path on the CPU:
- ``norm_silu`` (one Triton pass on CUDA that writes straight into ``out``/``tail``/``sum_out``) runs the
  torch expression with tracking paused, so its float32 temporaries (which the GPU never allocates) are not
  counted; so does the upsamplers' weave (``interleave_phases``), its output counted; the attention block's RMSNorm (the torch expression on the GPU too) is counted.
- bf16 (the GPU's dtype): CPU conv3d in float32 returns channels-first outputs (extra copies downstream),
  in bf16 channels-last, as cuDNN does.
- ``--kernel``: the path of that ``conv_kernel``: ``auto`` (the default) the calls of
  ``oasis.vae_conv.AUTO_CUDA_WIDTHS`` output channels that ``oasis.vae_cuda.channels_why_not`` admits, ``cuda``
  all it admits, ``cudnn`` none. The CUDA op is stood in for by its contract (``oasis.vae_cuda.conv3d_k3_reference``)
  with tracking paused but its output, which the op's caller allocates or the stand-in allocates as the op would.
Not modelled: cuDNN's workspace (the tuned path allocates it per call from torch's allocator: ~0.06 GiB
at the GPU's peak per docs/PERF.md), the caching allocator's 512-byte rounding.

Scaling to 720x1280: every tensor of >= 3 dims (activations, caches, the output video, the latents) is
multiplied by the area ratio (90*160)/(H*W); weights and 1-D bias sums are not.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import sys
import time
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import oasis.wan_vae as wv  # noqa: E402
from oasis import vae_conv, vae_kernels  # noqa: E402
from oasis.vae_kernels import interleave_phases_reference, norm_silu_reference  # noqa: E402

GIB = 2 ** 30


def _site():
    """The oasis/ frames of the current stack, innermost first: [(file, line, function), ...]."""
    f = sys._getframe(2)
    out = []
    while f is not None:
        fn = f.f_code.co_filename
        if "/oasis/" in fn:
            out.append((fn.rsplit("/", 1)[-1], f.f_lineno, f.f_code.co_name))
        f = f.f_back
    return out


class Rec:
    __slots__ = ("ref", "nbytes", "shape", "dtype", "site", "stage", "ctx", "op", "seq", "scales")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)


class Tracker(TorchDispatchMode):
    def __init__(self, base_tensors, cache_getter, names):
        super().__init__()
        self.base = {}  # ptr -> (nbytes, what)
        for what, t in base_tensors:
            s = t.untyped_storage()
            self.base.setdefault(s.data_ptr(), (s.nbytes(), what, t.dim() if what == "input z" else 0))
        self.base_bytes = sum(v[0] for v in self.base.values())
        self.live: dict[int, Rec] = {}
        self.total = 0  # live activation bytes (base excluded)
        self.peak = 0
        self.peak_info = None
        self.paused = 0
        self.seq = 0
        self.stage = []  # stack of stage names
        self.ctx = {"chunk": None}
        self.timeline = []  # (seq, total after op, stage)
        self.stage_log = []  # (event, stage, ctx, total, seq)
        self.cache_getter = cache_getter
        self.names = names

    def purge(self):
        dead = [k for k, r in self.live.items() if r.ref.expired()]
        for k in dead:
            self.total -= self.live.pop(k).nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.purge()
        out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        self.seq += 1
        new = False
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            s = t.untyped_storage()
            p, n = s.data_ptr(), s.nbytes()
            if n == 0 or p in self.live or p in self.base:
                continue
            self.live[p] = Rec(ref=StorageWeakRef(s), nbytes=n, shape=tuple(t.shape), dtype=str(t.dtype).replace("torch.", ""),
                               site=_site(), stage="/".join(self.stage), ctx=dict(self.ctx), op=str(func),
                               seq=self.seq, scales=t.dim() >= 3)
            self.total += n
            new = True
        if new:
            self.timeline.append((self.seq, self.total, "/".join(self.stage)))
            if self.total > self.peak:
                self.peak = self.total
                self.peak_info = self.snapshot(str(func))
        return out

    def snapshot(self, op):
        cache = self.cache_getter() or {}
        cache_ptr = {}
        for m, v in cache.items():
            cache_ptr[v.untyped_storage().data_ptr()] = self.names.get(m, type(m).__name__)
        items = []
        for p, r in self.live.items():
            if r.ref.expired():
                continue
            items.append(dict(ptr=p, nbytes=r.nbytes, shape=r.shape, dtype=r.dtype, scales=r.scales,
                              site=r.site, stage=r.stage, ctx=r.ctx, op=r.op, seq=r.seq,
                              cache=cache_ptr.get(p)))
        return dict(op=op, seq=self.seq, stage="/".join(self.stage), ctx=dict(self.ctx), stack=_site(),
                    total=self.total, items=items, n_cache_entries=len(cache))

    def mark(self, event, name):
        self.purge()
        if event == "start" and name == "up_blocks.2":
            self.ctx["piece"] = self.ctx.get("piece", -1) + 1
        self.stage_log.append((event, name, dict(self.ctx), self.total, self.seq))


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--latent", nargs=3, type=int, default=[9, 12, 20])
    p.add_argument("--piece", type=int, default=2)
    p.add_argument("--chunk", type=int, default=1)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--json", default=None)
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--kernel", default="auto", choices=["auto", "cudnn", "cuda"],
                   help="the convolutions' path: cuDNN's, or that of conv_kernel=\"cuda\" or \"auto\" (the CUDA op "
                        "stood in for)")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    dt = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    vae = wv.WanVAEDecoder().eval().requires_grad_(False).to(dt)
    if not a.no_channels_last:
        vae.channels_last()
    t, h, w = a.latent
    z = torch.randn(1, 16, t, h, w, dtype=dt)
    scale = (90 * 160) / (h * w)
    # bf16 on the GPU; a float32 run is reported at half its bytes
    to_bf16 = 0.5 if dt == torch.float32 else 1.0

    names = {m: n for n, m in vae.named_modules()}
    holder = {}

    # the upsamplers' 2x2 phase kernels: weights derived once per weight (oasis.vae_conv.upsample2x_conv3x3)
    phases = [vae_kernels.kept_per_tensor(m.resample[1].weight, vae_conv.phase_weights, tag="phases")
              for m in vae.modules() if isinstance(m, wv.Upsample)]
    base = [("weight", q) for q in [*vae.parameters(), *phases]] + [("buffer", b) for b in vae.buffers()] + \
        [("input z", z)]
    tr = Tracker(base, lambda: holder.get("cache"), names)

    # norm_silu as the Triton pass: no temporaries, writes into out/tail (and a residual block's sum into sum_out)
    def norm_silu_gpu_like(x, gamma, scale_, *, out=None, silu=True, bias=None, tail=None, residual=None,
                           sum_out=None):
        tr.paused += 1
        try:
            if residual is not None:
                x = x + bias.reshape(-1, *([1] * (x.dim() - 2))) + residual if bias is not None else x + residual
                bias = None
            y = norm_silu_reference(x, gamma, scale_, silu, bias)
        finally:
            tr.paused -= 1
        if sum_out is not None:
            sum_out.copy_(x)
        if out is not None:
            out.copy_(y)
            y = out
        del_y = y
        if tail is not None:
            tail.copy_(del_y[:, :, del_y.shape[2] - tail.shape[2]:])
        return y

    # the upsamplers' weave as the Triton pass: its output only
    def interleave_phases_gpu_like(o, bias=None):
        tr.paused += 1
        try:
            y = interleave_phases_reference(o, bias)
        finally:
            tr.paused -= 1
        out = torch.empty(y.shape, dtype=y.dtype, memory_format=torch.channels_last)
        return out.copy_(y)

    wv.norm_silu = norm_silu_gpu_like
    vae_kernels.interleave_phases = interleave_phases_gpu_like
    if a.kernel != "cudnn":
        _stand_in_cuda_kernel(tr, vae_conv.AUTO_CUDA_WIDTHS if a.kernel == "auto" else None)

    # stage hooks
    stages = [("conv_in", vae.decoder.conv_in), ("mid_block", vae.decoder.mid_block)] + \
             [(f"up_blocks.{i}", b) for i, b in enumerate(vae.decoder.up_blocks)]
    def pre(n):
        def hook(mod, args):
            tr.stage.append(n)
            tr.mark("start", n)
        return hook

    def post(n):
        def hook(mod, args, out):
            tr.mark("end", n)
            tr.stage.pop()
        return hook

    for name, m in stages:
        m.register_forward_pre_hook(pre(name))
        m.register_forward_hook(post(name))
    def marked(name, fn):
        """``fn`` as a stage of its own (a method the decode calls without the module's forward)."""
        def wrapped(*args, **kw):
            tr.stage.append(name)
            tr.mark("start", name)
            try:
                return fn(*args, **kw)
            finally:
                tr.mark("end", name)
                tr.stage.pop()
        return wrapped

    co = vae.decoder.conv_out
    co.forward_normed = marked("conv_out", co.forward_normed)
    # the decoder's head runs up_blocks.0's residual blocks, its tail that block's upsampler
    first = vae.decoder.up_blocks[0]
    first.blocks, first.upsample = marked("up_blocks.0", first.blocks), marked("up_blocks.0", first.upsample)
    # the cache from the decoder's calls (WanVAE.decode runs its head on groups of latent frames, then each chunk
    # through its tail); the chunk index: the tail's calls
    calls = {"n": -1}
    real_head, real_tail = vae.decoder.head, vae.decoder.tail

    def head(z, cache, *args, **kwargs):
        holder["cache"] = cache
        tr.ctx["chunk"] = calls["n"] + 1  # (the group's first chunk)
        tr.ctx["piece"] = -1
        return real_head(z, cache, *args, **kwargs)

    def tail(handed, cache, *args, **kwargs):
        holder["cache"] = cache
        calls["n"] += 1
        tr.ctx["chunk"] = calls["n"]
        tr.ctx["piece"] = -1
        return real_tail(handed, cache, *args, **kwargs)

    vae.decoder.head, vae.decoder.tail = head, tail

    t0 = time.time()
    with torch.no_grad(), tr:
        video = vae.decode(z, chunk=a.chunk, piece_frames=a.piece)
    el = time.time() - t0
    print(f"decode {tuple(z.shape)} {a.dtype} chunk={a.chunk} piece={a.piece}: {el:.1f} s, {tr.seq} allocating ops; "
          f"video {tuple(video.shape)}")
    report(tr, scale, to_bf16, a, vae)
    if a.json:
        pi = tr.peak_info
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "scale": scale, "base_bytes": tr.base_bytes, "peak": tr.peak,
                       "peak_info": {k: v for k, v in pi.items()}, "stage_log": tr.stage_log,
                       "timeline": tr.timeline}, f, default=str)


def _stand_in_cuda_kernel(tr, widths=None) -> None:
    """The decoder's path with conv_kernel="cuda" on the CPU (``widths``: "auto"'s output widths only): the calls
    the kernel takes by its channel rule, each run as its contract with tracking paused; the output (a tensor the
    GPU op writes) counted."""
    from oasis import vae_conv, vae_cuda

    def takes(x, weight, time_pad, *, prev=None, residual=None, norm=False):
        return (time_pad == 2 and weight.dim() == 5 and tuple(weight.shape[2:]) == (3, 3, 3)
                and (widths is None or weight.shape[0] in widths)
                and vae_cuda.channels_why_not(weight.shape[1], weight.shape[0], norm) is None)

    def conv3d_k3(x, weight, bias=None, *, out=None, **kw):
        if out is None:
            out = torch.empty((x.shape[0], weight.shape[0], *x.shape[2:]), dtype=x.dtype,
                              memory_format=torch.channels_last_3d)
        tr.paused += 1
        try:
            vae_cuda.conv3d_k3_reference(x, weight, bias, out=out, **kw)
        finally:
            tr.paused -= 1
        return out

    vae_conv.cuda_kernel_takes = takes
    vae_cuda.conv3d_k3 = conv3d_k3


def describe(it):
    """A short name of what an allocation is: its innermost oasis/ frame."""
    s = it["site"]
    if not s:
        return "?"
    return " < ".join(f"{fn}:{ln}" for f, ln, fn in s[:3])


def report(tr, scale, to_bf16, a, vae):
    g = lambda b: b / GIB  # noqa: E731
    sc = lambda it: it["nbytes"] * (scale if it["scales"] else 1.0) * to_bf16  # noqa: E731
    base_scaled = 0.0
    for n, what, dim in tr.base.values():
        base_scaled += n * (scale if dim >= 3 else 1.0) * to_bf16
    pi = tr.peak_info
    print(f"\nbase (weights + z): {g(tr.base_bytes) * 1024:.2f} MiB here, {g(base_scaled):.3f} GiB at 720p bf16")
    print(f"peak of activations here: {tr.peak / 2**20:.2f} MiB at op #{pi['seq']} ({pi['op']}), stage {pi['stage']}, "
          f"ctx {pi['ctx']}")
    print("stack at the peak (innermost first):")
    for f, ln, fn in pi["stack"]:
        print(f"   {f}:{ln} {fn}")
    items = pi["items"]
    tot = sum(sc(it) for it in items)
    print(f"peak scaled to 720p bf16: activations {g(tot):.3f} GiB + base {g(base_scaled):.3f} = {g(tot + base_scaled):.3f} GiB")
    # groups
    cache_by_stage = collections.defaultdict(lambda: [0.0, 0])
    other = collections.defaultdict(lambda: [0.0, 0, set()])
    for it in items:
        b = sc(it)
        if it["cache"]:
            nm = it["cache"].replace("decoder.", "")
            key = ".".join(nm.split(".")[:2]) if nm.startswith("up_blocks") else nm.split(".")[0]
            cache_by_stage[key][0] += b
            cache_by_stage[key][1] += 1
        else:
            k = (describe(it), it["stage"])
            other[k][0] += b
            other[k][1] += 1
            other[k][2].add((it["shape"], it["dtype"]))
    ctot = sum(v[0] for v in cache_by_stage.values())
    print(f"\n causal cache (values of the cache dict at the peak): {g(ctot):.3f} GiB, "
          f"{sum(v[1] for v in cache_by_stage.values())} entries of {pi['n_cache_entries']}")
    for k, (b, n) in sorted(cache_by_stage.items(), key=lambda kv: -kv[1][0]):
        print(f"   {k:14s} {g(b):7.3f} GiB  ({n} entries)")
    print(" other live storages (by allocation site and stage):")
    for (site, stage), (b, n, shapes) in sorted(other.items(), key=lambda kv: -kv[1][0]):
        print(f"   {g(b):7.3f} GiB  x{n:<3d} {site:42s} [{stage}] {sorted(shapes, key=str)[:3]}")
    print("\n every non-cache storage live at the peak (720p bf16 GiB; allocated in stage, chunk/piece; site):")
    for it in sorted(items, key=lambda it: it["seq"]):
        if not it["cache"]:
            print(f"   {g(sc(it)):7.3f}  {str(it['shape']):24s} {it['stage']:12s} c{it['ctx'].get('chunk')}/p{it['ctx'].get('piece')}"
                  f"  {describe(it)}")
    # stage log
    print("\n stage start/end: live activations scaled to 720p bf16 (GiB), base excluded; max over calls in-stage")
    per = collections.OrderedDict()
    open_ = {}
    tl = tr.timeline
    seqs = [x[0] for x in tl]
    for ev, name, ctx, total, seq in tr.stage_log:
        if ev == "start":
            open_.setdefault(name, []).append((total, seq))
        else:
            st, sseq = open_[name].pop()
            i0, i1 = bisect.bisect_left(seqs, sseq), bisect.bisect_right(seqs, seq)
            inner = max([x[1] for x in tl[i0:i1]] + [st, total])
            per.setdefault(name, []).append((ctx["chunk"], st, total, inner))
    s_all = scale * to_bf16  # activations only
    for name, rows in per.items():
        mx = max(rows, key=lambda r: r[3])
        print(f"   {name:11s} calls {len(rows):2d}; worst call chunk {mx[0]}: start {g(mx[1] * s_all):.3f} "
              f"end {g(mx[2] * s_all):.3f} in-stage max {g(mx[3] * s_all):.3f}")
    # per chunk, first call of each stage for the last chunk
    last = max(r[0] for rows in per.values() for r in rows)
    print(f"   chunk {last} (the last) in order:")
    for ev, name, ctx, total, seq in tr.stage_log:
        if ctx["chunk"] == last:
            print(f"      {ev:5s} {name:11s} {g(total * s_all):.3f}")


if __name__ == "__main__":
    main()
