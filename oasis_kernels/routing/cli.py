"""``oasis-route``: calibrate a routing from data, re-assign it for another rho, compare two.

    oasis-route calibrate --model mymodel:build --inputs latents/ --rho 0.4 --out routing.json
    oasis-route assign routing.json --rho 0.3 --out routing_rho03.json
    oasis-route agree routing_a.json routing_b.json
    oasis-route show routing.json

``--model`` names a factory ``module:function`` (or ``path/to/file.py:function``) returning the
unrouted model; the module is looked up in the working directory first, then on ``sys.path``.
The model is a ``torch.nn.Module`` whose attention goes through
``oasis_kernels.routed_attention`` with an all-global plan that carries the real ``(T, H, W)``
grid. Each file in ``--inputs`` is one video: ``*.pt`` / ``*.safetensors`` hold a latent tensor
(or a dict of keyword arguments for the model); other files (videos) are turned into model
inputs by the factory module's ``load_input(path)``, e.g. with PyAV.

Every argument is checked before any work (importing the factory module, then building the
model, is the first work done); a bad one ends the program with one line on stderr and exit
code 2, as do unreadable or mismatched routing files.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import sys
import textwrap
from pathlib import Path

__all__ = ["main"]

EPILOG = """\
worked example: calibrate a model defined in ./mymodel.py on two latent videos

  # mymodel.py (in the working directory)
  import torch
  import oasis_kernels as ok

  class Attention(torch.nn.Module):
      def __init__(self, heads, grid):
          super().__init__()
          # the unrouted model: every head global, with the real (T, H, W) token grid
          self.plan = ok.RoutingPlan(grid, ["global"] * heads)
      def forward(self, q, k, v):                      # [B, N = T*H*W, heads, D]
          return ok.routed_attention(q, k, v, self.plan)

  def build():                                         # returns the model, unrouted
      return MyDiT(attention=Attention(heads=12, grid=(9, 45, 80)))

  # latents/v0.pt, latents/v1.pt: torch.save(latent, ...) of what the model's forward takes
  # (a tensor, or a dict of keyword arguments); other files need mymodel.load_input(path)

  $ oasis-route calibrate --model mymodel:build --inputs latents/ --rho 0.4 --out routing.json
  routing.json: 30 layers, 2 videos, 144 global heads (rho=0.4)
  $ oasis-route assign routing.json --rho 0.3 --out routing_rho03.json
  $ oasis-route agree routing.json routing_rho03.json     # fraction of equal assignments
  $ oasis-route show routing.json                         # one line per layer: g/i/w per head

Calls through ok.global_attention carry no grid (it is (1, 1, N)): use routed_attention with
a plan. Each attention call is attributed to the innermost module entered (--layers picks
which modules count). The statistics and Algorithm 1: oasis_kernels/routing/.
"""


class _Exit(Exception):
    """A clean one-line failure (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line ends with one line on stderr (exit code 2)."""

    def error(self, message):
        raise _Exit(f"{message} (see {self.prog} --help)")


# -- argument types (checked while parsing, before any work) -----------------------------------

def _rho(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1] (fraction of heads kept global), got {text!r}")
    return value


def _eps(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1), got {text!r}")
    return value


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value
    return parse


def _window(text: str) -> tuple[int, int, int]:
    from ..plan import normalize_window

    try:
        parts = [int(x) for x in text.split(",")]
        return normalize_window(parts[0] if len(parts) == 1 else parts)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be three odd positive sizes Pt,Ph,Pw (e.g. 3,5,5) or one odd size "
                                         f"for a cube, got {text!r}") from None


def _regex(text: str) -> "re.Pattern":
    try:
        return re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"not a regular expression ({exc}): {text!r}") from None


def _model_spec(text: str) -> tuple[str, str]:
    module, sep, function = text.rpartition(":")
    if not sep or not module or not function.isidentifier():
        raise argparse.ArgumentTypeError(f"must be 'module:function' or 'file.py:function', got {text!r}")
    return module, function


# -- checks that need the file system or torch ------------------------------------------------

def _device(name):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise _Exit(f"--device {name!r} is not a torch device (cuda, cuda:1, cpu)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise _Exit(f"--device {name}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise _Exit(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise _Exit(f"--device {name}: only cuda and cpu are supported")
    return device


def _check_backend(backend: str, device) -> None:
    if backend != "triton":
        return
    try:
        import triton  # noqa: F401
    except ImportError:
        raise _Exit("--backend triton: Triton is not installed; use --backend auto or reference") from None
    if device.type == "cuda":
        import torch

        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            raise _Exit(f"--backend triton needs a GPU of compute capability 8.0+, {device} has {major}.{minor}; "
                        f"use --backend reference")
    elif os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise _Exit(f"--backend triton needs --device cuda (the device is {device}); on the CPU use --backend auto "
                    f"or reference (or set TRITON_INTERPRET=1 for Triton's slow interpreter)")


def _input_files(folder: str, limit: int) -> list[Path]:
    path = Path(folder)
    if not path.exists():
        raise _Exit(f"--inputs {folder}: no such folder")
    if not path.is_dir():
        raise _Exit(f"--inputs {folder}: not a folder (give the folder that holds one file per video)")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise _Exit(f"--inputs {folder}: the folder holds no input files")
    return files[:limit] if limit else files


def _check_out(out: str, option: str) -> None:
    if not out:
        raise _Exit(f"{option}: give a file name such as routing.json")
    path = Path(out)
    if path.is_dir():
        raise _Exit(f"{option} {out}: is a folder; give a file name such as routing.json")
    parent = path.parent
    if not parent.is_dir():
        raise _Exit(f"{option} {out}: the folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise _Exit(f"{option} {out}: the folder {str(parent)!r} is not writable")
    existed = path.exists()
    try:  # opened as the save will open it (a folder writable by its mode may still refuse: /sys, a read-only mount)
        with open(path, "a"):
            pass
    except OSError as exc:
        raise _Exit(f"{option} {out}: cannot be written ({exc.strerror or exc})") from None
    if not existed:
        path.unlink()


def _save(routing, out: str) -> None:
    try:
        routing.save(out)
    except OSError as exc:  # a full disk, a file made read-only meanwhile
        raise _Exit(f"--out {out}: writing it failed ({exc.strerror or exc})") from None


def _import_factory(module_name: str, function: str):
    """The module and its factory; plain module names are looked up in the working directory
    first (a console script's ``sys.path`` starts with its own bin folder, not the cwd)."""
    spec = f"{module_name}:{function}"
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise _Exit(f"--model {spec}: no such file {module_name!r}")
        # its folder goes on sys.path so that the file's own imports of its neighbours work
        sys.path.insert(0, str(path.resolve().parent))
        loader_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[path.stem] = module
        try:
            loader_spec.loader.exec_module(module)
        except ImportError as exc:
            sys.modules.pop(path.stem, None)
            raise _Exit(f"--model {spec}: importing {module_name} failed: {type(exc).__name__}: {exc}") from None
    else:
        cwd = os.getcwd()
        if cwd not in sys.path:
            sys.path.insert(0, cwd)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
                raise _Exit(f"--model {spec}: no module {module_name!r} in the working directory ({cwd}) or on "
                            f"sys.path; for a file give 'path/to/file.py:function'") from None
            raise _Exit(f"--model {spec}: importing {module_name!r} failed: {exc}") from None
        except ImportError as exc:
            raise _Exit(f"--model {spec}: importing {module_name!r} failed: {exc}") from None
    factory = getattr(module, function, None)
    if factory is None:
        raise _Exit(f"--model {spec}: module {module_name!r} has no {function!r}")
    if not callable(factory):
        raise _Exit(f"--model {spec}: {function!r} is a {type(factory).__name__}, not a function")
    return module, factory


def _check_input_kinds(files, module) -> None:
    latent = {".pt", ".safetensors"}
    if not hasattr(module, "load_input"):
        other = [p for p in files if p.suffix not in latent]
        if other:
            raise _Exit(f"--inputs: {other[0]} is not a .pt/.safetensors latent and the model module "
                        f"{module.__name__!r} has no load_input(path) to read it")
    if any(p.suffix == ".safetensors" for p in files) and importlib.util.find_spec("safetensors") is None:
        raise _Exit("--inputs holds .safetensors files but the safetensors package is not installed "
                    "(pip install safetensors)")


def _load_input(path: Path, module, device):
    import torch

    if path.suffix in (".pt", ".safetensors"):
        try:
            if path.suffix == ".pt":
                obj = torch.load(path, map_location=device, weights_only=True)
            else:
                from safetensors.torch import load_file

                obj = load_file(str(path), device=str(device))
        except Exception as exc:  # a damaged or foreign file (the user's load_input keeps its traceback)
            first = (str(exc).splitlines() or [""])[0]
            raise _Exit(f"{path}: cannot read it as a {path.suffix} file ({type(exc).__name__}: {first})") from None
    else:
        obj = module.load_input(path)
    if isinstance(obj, torch.Tensor):
        return (obj.to(device),), {}
    if isinstance(obj, dict):
        return (), {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in obj.items()}
    raise _Exit(f"{path}: expected a tensor or a dict of model arguments, got {type(obj).__name__}")


def _load(path: str):
    from .calibrate import load_routing

    try:
        return load_routing(path)
    except FileNotFoundError:
        raise _Exit(f"{path}: no such routing file") from None
    except IsADirectoryError:
        raise _Exit(f"{path}: is a folder, not a routing file") from None
    except OSError as exc:
        raise _Exit(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise _Exit(str(exc)) from None


# -- commands ------------------------------------------------------------------------------------

def _calibrate(args) -> int:
    import torch

    from .. import api
    from ..plan import Mode
    from .calibrate import RoutingCalibrator

    # everything that needs no model, cheapest first
    device = _device(args.device)
    _check_backend(args.backend, device)
    files = _input_files(args.inputs, args.limit)
    _check_out(args.out, "--out")
    module, factory = _import_factory(*args.model)
    _check_input_kinds(files, module)
    if not hasattr(module, "load_input"):  # every latent file read once before the model is made: a bad one
        for path in files:                 # fails now, not after the ones before it were calibrated
            _load_input(path, module, "cpu")

    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise _Exit(f"--model {':'.join(args.model)} returned a {type(model).__name__}, not a torch.nn.Module")
    layer_filter = None
    if args.layers is not None:
        names = [name for name, _ in model.named_modules()]
        if not any(args.layers.search(name) for name in names):
            raise _Exit(f"--layers {args.layers.pattern!r} matches none of the model's {len(names)} module names "
                        f"(e.g. {', '.join(repr(n) for n in names[1:4])})")
        layer_filter = lambda name, m: bool(args.layers.search(name))  # noqa: E731
    model = model.to(device).eval()

    def unrouted_only(q, k, plan, scale):
        if any(m != Mode.GLOBAL for m in plan.modes):
            raise _Exit(f"the model already routes some heads ({plan}); calibrate the unrouted model, whose "
                        f"routed_attention plans mark every head global")

    from tqdm import tqdm

    cal = RoutingCalibrator(args.window, eps=args.eps, query_stride=args.query_stride, backend=args.backend)
    # updated by hand: iterating over the bar would close it (leave=True) as a failure unwinds
    bar = tqdm(total=len(files), desc="calibrating", unit="video")
    api.add_observer(unrouted_only)
    try:
        with torch.no_grad():
            for i, path in enumerate(files):
                a, kw = _load_input(path, module, device)
                try:
                    with cal.record(model, layer_filter):
                        model(*a, **kw)
                except NotImplementedError as exc:  # e.g. --backend triton on inputs its kernels cannot take
                    raise _Exit(f"{path}: {str(exc).splitlines()[0]}") from None
                except ValueError as exc:  # the model's own check of its input (a latent of another size)
                    raise _Exit(f"{path}: the model refused it: {str(exc).splitlines()[0]}") from None
                if i == 0 and not cal.layers:
                    where = f" inside the modules --layers {args.layers.pattern!r} picks" if args.layers else ""
                    raise _Exit(f"no attention calls were observed{where} on {path.name}: the model must call "
                                f"oasis_kernels.routed_attention with an all-global RoutingPlan")
                bar.update(1)
    except BaseException:
        bar.leave = False  # a failure's one line replaces the progress bar instead of following it
        raise
    finally:
        bar.close()
        api.remove_observer(unrouted_only)
    try:
        routing = cal.assign(args.rho)
    except ValueError as exc:  # e.g. non-finite statistics
        raise _Exit(str(exc)) from None
    _save(routing, args.out)
    print(f"{args.out}: {routing.num_layers} layers, {routing.videos} videos, {routing.num_global} global heads "
          f"(rho={args.rho})")
    return 0


def _assign(args) -> int:
    _check_out(args.out, "--out")
    try:
        routing = _load(args.routing).reassign(args.rho)
    except ValueError as exc:  # a file without statistics
        raise _Exit(f"{args.routing}: {exc}") from None
    _save(routing, args.out)
    print(f"{args.out}: rho={args.rho}, {routing.num_global} global heads")
    return 0


def _agree(args) -> int:
    from .calibrate import routing_agreement

    a, b = _load(args.a), _load(args.b)
    try:
        print(f"{routing_agreement(a, b):.4f}")
    except ValueError as exc:  # two different models
        raise _Exit(f"{args.a} and {args.b}: {exc}") from None
    return 0


def _show(args) -> int:
    r = _load(args.routing)
    print(f"rho={r.rho} window={r.window} eps={r.eps} videos={r.videos} query_stride={r.query_stride}")
    for l in r.layers:
        print(f"{l.name:40s} {''.join(m.short for m in l.modes)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = _Parser(prog="oasis-route", description=__doc__.split("\n\n")[0].strip("`").replace("``", ""),
                epilog=EPILOG, formatter_class=fmt)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{calibrate,assign,agree,show}")
    c = sub.add_parser(
        "calibrate", help="compute statistics over videos and route heads (Algorithm 1)", epilog=EPILOG,
        formatter_class=fmt,
        description=textwrap.fill(
            "Run the unrouted model on every input, gather each attention layer's per-head statistics (KL "
            "divergence of the global map to the intra-frame and window maps) and route the heads with "
            "Algorithm 1. The model must call oasis_kernels.routed_attention with a RoutingPlan that marks "
            "every head global and carries the real (T, H, W) grid. All arguments are checked before the "
            "model is built.", 92))
    c.add_argument("--model", required=True, type=_model_spec, metavar="MODULE:FUNCTION",
                   help="factory returning the unrouted model: 'module:function' (looked up in the working "
                        "directory first, then on sys.path) or 'path/to/file.py:function'")
    c.add_argument("--inputs", required=True, metavar="FOLDER",
                   help="folder with one video per file: a .pt/.safetensors latent tensor (or dict of model keyword "
                        "arguments), or any file the factory module's load_input(path) reads; dotfiles are skipped")
    c.add_argument("--rho", type=_rho, default=0.4, help="fraction of all heads kept global, in [0, 1] (default 0.4, "
                                                         "the paper's)")
    c.add_argument("--window", type=_window, default=(3, 5, 5), metavar="PT,PH,PW",
                   help="window pattern's size in frames, rows and columns, odd (default 3,5,5; one number: a cube)")
    c.add_argument("--eps", type=_eps, default=1e-6,
                   help="smoothing of the local attention maps, in (0, 1): the KL is taken to "
                        "(1-eps)*M_local + eps/N (default 1e-6)")
    c.add_argument("--query-stride", type=_count(1), default=1, metavar="K",
                   help="use every K-th query for the statistics (default 1: all)")
    c.add_argument("--layers", type=_regex, default=None, metavar="REGEX",
                   help="regex on module names picking the attention layers (default: every module; a call counts "
                        "for the innermost one)")
    c.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"],
                   help="statistics implementation: triton (CUDA), reference (chunked torch, any device) or auto "
                        "(triton on CUDA, else reference; default)")
    c.add_argument("--device", default=None, help="torch device for the model, e.g. cuda, cuda:1, cpu "
                                                  "(default: cuda if present, else cpu)")
    c.add_argument("--limit", type=_count(0), default=0, metavar="N",
                   help="use only the first N inputs in name order (default 0: all)")
    c.add_argument("--out", default="routing.json", metavar="FILE",
                   help="routing file to write (default routing.json; its folder must exist)")
    c.set_defaults(fn=_calibrate)
    a = sub.add_parser("assign", help="re-run Algorithm 1 on a routing file's statistics for another rho",
                       description="Route again from the statistics stored in a routing file (no model run).")
    a.add_argument("routing", metavar="ROUTING_JSON", help="routing file written by oasis-route calibrate")
    a.add_argument("--rho", type=_rho, required=True, help="fraction of all heads kept global, in [0, 1]")
    a.add_argument("--out", required=True, metavar="FILE", help="routing file to write (its folder must exist)")
    a.set_defaults(fn=_assign)
    g = sub.add_parser("agree", help="fraction of identical layer-head assignments of two routing files",
                       description="Print the fraction of (layer, head) pairs routed alike by two routing files of "
                                   "one model (the paper's stability measure).")
    g.add_argument("a", metavar="ROUTING_A", help="first routing file")
    g.add_argument("b", metavar="ROUTING_B", help="second routing file (same layers and heads)")
    g.set_defaults(fn=_agree)
    s = sub.add_parser("show", help="print a routing file",
                       description="Print a routing file's settings and one line per layer: g, i or w per head.")
    s.add_argument("routing", metavar="ROUTING_JSON", help="routing file")
    s.set_defaults(fn=_show)
    return p


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.fn(args)
    except _Exit as exc:
        print(f"oasis-route: error: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("oasis-route: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `oasis-route show r.json | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
