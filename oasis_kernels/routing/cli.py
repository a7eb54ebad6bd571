"""``oasis-route``: calibrate a routing from data, re-assign it for another rho, compare two.

    oasis-route calibrate --model mypkg.models:build --inputs latents/ --rho 0.4 --out routing.json
    oasis-route assign routing.json --rho 0.3 --out routing_rho03.json
    oasis-route agree routing_a.json routing_b.json
    oasis-route show routing.json

``--model`` names a factory ``module:function`` returning the unrouted model (a
``torch.nn.Module`` whose attention goes through ``oasis_kernels.routed_attention`` with an
all-global plan). Each file in ``--inputs`` is one video: ``*.pt`` / ``*.safetensors`` hold a
latent tensor (or a dict of keyword arguments for the model); other files (videos) are turned
into model inputs by the factory module's ``load_input(path)``, e.g. with PyAV.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

from .calibrate import RoutingCalibrator, load_routing, routing_agreement

__all__ = ["main"]


def _load_factory(spec: str):
    if ":" not in spec:
        raise SystemExit(f"--model must be 'module:function', got {spec!r}")
    mod_name, fn_name = spec.split(":", 1)
    module = importlib.import_module(mod_name)
    return module, getattr(module, fn_name)


def _load_input(path: Path, module, device):
    if path.suffix == ".pt":
        obj = torch.load(path, map_location=device, weights_only=True)
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj = load_file(str(path), device=str(device))
    elif hasattr(module, "load_input"):
        obj = module.load_input(path)
    else:
        raise SystemExit(f"{path}: not a .pt/.safetensors latent and the model module has no load_input(path)")
    if isinstance(obj, torch.Tensor):
        return (obj.to(device),), {}
    if isinstance(obj, dict):
        return (), {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in obj.items()}
    raise SystemExit(f"{path}: expected a tensor or a dict of model arguments, got {type(obj).__name__}")


def _calibrate(args) -> int:
    from tqdm import tqdm

    module, factory = _load_factory(args.model)
    device = torch.device(args.device)
    model = factory().to(device).eval()
    files = sorted(p for p in Path(args.inputs).iterdir() if p.is_file())
    if args.limit:
        files = files[: args.limit]
    if not files:
        raise SystemExit(f"no input files in {args.inputs}")
    cal = RoutingCalibrator(tuple(int(x) for x in args.window.split(",")), eps=args.eps,
                            query_stride=args.query_stride, backend=args.backend)
    layer_filter = None
    if args.layers:
        import re

        pattern = re.compile(args.layers)
        layer_filter = lambda name, m: bool(pattern.search(name))  # noqa: E731
    with torch.no_grad():
        for path in tqdm(files, desc="calibrating", unit="video"):
            a, kw = _load_input(path, module, device)
            with cal.record(model, layer_filter):
                model(*a, **kw)
    if not cal.layers:
        raise SystemExit("no attention calls were observed: does the model call oasis_kernels.routed_attention "
                         "with a RoutingPlan inside the --layers modules?")
    routing = cal.assign(args.rho)
    routing.save(args.out)
    print(f"{args.out}: {routing.num_layers} layers, {routing.videos} videos, {routing.num_global} global heads "
          f"(rho={args.rho})")
    return 0


def _assign(args) -> int:
    routing = load_routing(args.routing).reassign(args.rho)
    routing.save(args.out)
    print(f"{args.out}: rho={args.rho}, {routing.num_global} global heads")
    return 0


def _agree(args) -> int:
    a, b = load_routing(args.a), load_routing(args.b)
    print(f"{routing_agreement(a, b):.4f}")
    return 0


def _show(args) -> int:
    r = load_routing(args.routing)
    print(f"rho={r.rho} window={r.window} eps={r.eps} videos={r.videos} query_stride={r.query_stride}")
    for l in r.layers:
        print(f"{l.name:40s} {''.join(m.short for m in l.modes)}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="oasis-route", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calibrate", help="compute statistics over videos and route heads (Algorithm 1)")
    c.add_argument("--model", required=True, help="factory 'module:function' returning the unrouted model")
    c.add_argument("--inputs", required=True, help="directory: one .pt/.safetensors latent (or video) per file")
    c.add_argument("--rho", type=float, default=0.4, help="fraction of heads kept global (paper: 0.4)")
    c.add_argument("--window", default="3,5,5")
    c.add_argument("--eps", type=float, default=1e-6)
    c.add_argument("--query-stride", type=int, default=1, help="use every k-th query for the statistics")
    c.add_argument("--layers", default=None, help="regex on module names picking the attention layers")
    c.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"])
    c.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    c.add_argument("--limit", type=int, default=0, help="use at most this many inputs")
    c.add_argument("--out", default="routing.json")
    c.set_defaults(fn=_calibrate)
    a = sub.add_parser("assign", help="re-run Algorithm 1 on a routing file's statistics for another rho")
    a.add_argument("routing")
    a.add_argument("--rho", type=float, required=True)
    a.add_argument("--out", required=True)
    a.set_defaults(fn=_assign)
    g = sub.add_parser("agree", help="fraction of identical layer-head assignments of two routing files")
    g.add_argument("a")
    g.add_argument("b")
    g.set_defaults(fn=_agree)
    s = sub.add_parser("show", help="print a routing file")
    s.add_argument("routing")
    s.set_defaults(fn=_show)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
