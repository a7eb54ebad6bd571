"""Calibration: accumulate routing statistics over many videos, write and read routing files.

Typical use, with the unrouted model (every head global, attention called through
``oasis_kernels.routed_attention`` with a plan that carries the grid)::

    cal = RoutingCalibrator(window=(3, 5, 5), eps=1e-6, query_stride=4)
    for latent in tqdm(latents):
        with cal.record(model, layer_filter=lambda name, m: name.endswith("self_attn")):
            model(latent)
    routing = cal.assign(rho=0.4)          # Algorithm 1 over all layers and heads
    routing.save("routing.json")
    plans = load_routing("routing.json").plans(grid)   # one RoutingPlan per layer

Routing file (JSON, ``"format": "oasis-routing/1"``)::

    {"format", "rho", "window", "eps", "query_stride", "videos", "num_global",
     "layers": [{"name", "modes": ["global" | "intra" | "window", ...],
                 "stats": {"kl_intra": [...], "kl_window": [...], "mass_intra": [...], ...}}]}
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import api
from ..plan import Mode, RoutingPlan, normalize_window
from .assign import assign_heads
from .stats import FIELDS, head_statistics

__all__ = ["RoutingCalibrator", "RoutingFile", "LayerRouting", "load_routing", "routing_agreement"]

FORMAT = "oasis-routing/1"


@dataclass
class LayerRouting:
    name: str
    modes: list[Mode]
    stats: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class RoutingFile:
    """Per-layer head modes plus the statistics and settings they came from."""

    layers: list[LayerRouting]
    rho: float
    window: tuple[int, int, int]
    eps: float
    query_stride: int
    videos: int
    num_global: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def plan(self, layer: "int | str", grid) -> RoutingPlan:
        """The :class:`RoutingPlan` of one layer (by index or name) for a token grid."""
        if isinstance(layer, bool):  # True would be layer 1
            raise TypeError(f"layer must be an index or a name, got {layer!r}")
        if isinstance(layer, str):
            names = [l.name for l in self.layers]
            if layer not in names:
                raise ValueError(f"no layer {layer!r} in this routing file (layers: {names[:4]}...)")
            layer = names.index(layer)
        if not 0 <= layer < len(self.layers):
            raise ValueError(f"layer index {layer} out of range for a routing file of {len(self.layers)} layers")
        return RoutingPlan(grid, self.layers[layer].modes, self.window)

    def plans(self, grid) -> list[RoutingPlan]:
        return [self.plan(i, grid) for i in range(len(self.layers))]

    def check_model(self, num_layers: int, heads: int) -> None:
        """Raise ValueError unless the file routes ``num_layers`` layers of ``heads`` heads each."""
        if num_layers != len(self.layers):
            raise ValueError(f"routing file has {len(self.layers)} layers but the model has {num_layers}")
        for l in self.layers:
            if len(l.modes) != heads:
                raise ValueError(f"routing file layer {l.name!r} routes {len(l.modes)} heads but the model has {heads}")

    def to_json(self) -> dict:
        return {
            "format": FORMAT, "rho": self.rho, "window": list(self.window), "eps": self.eps,
            "query_stride": self.query_stride, "videos": self.videos, "num_global": self.num_global,
            "layers": [{"name": l.name, "modes": [m.name.lower() for m in l.modes], "stats": l.stats}
                       for l in self.layers],
        }

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    def reassign(self, rho: float) -> "RoutingFile":
        """Algorithm 1 again from the stored statistics, for another rho (no recomputation)."""
        missing = [l.name for l in self.layers if not {"kl_intra", "kl_window"} <= set(l.stats)]
        if missing:
            raise ValueError(f"routing file has no kl_intra/kl_window statistics for layers {missing[:3]}; "
                             f"re-assignment needs them (calibrate again)")
        scores = [[[a, b] for a, b in zip(l.stats["kl_intra"], l.stats["kl_window"])] for l in self.layers]
        result = assign_heads(scores, rho)
        layers = [LayerRouting(l.name, list(m), l.stats) for l, m in zip(self.layers, result.modes)]
        return RoutingFile(layers, float(rho), self.window, self.eps, self.query_stride, self.videos, result.num_global)


def load_routing(path) -> RoutingFile:
    """Read a routing file; ValueError naming the file when it is not one (OSError when unreadable)."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not an oasis routing file (not JSON: {exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: not an oasis routing file (format={found!r}, expected {FORMAT!r})")
    try:
        routing = RoutingFile([_layer(l) for l in data["layers"]], data["rho"], normalize_window(data["window"]),
                              data["eps"], data["query_stride"], data["videos"], data["num_global"])
        _check_file(routing)
        return routing
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        what = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ValueError(f"{path}: damaged oasis routing file ({what})") from None


def _layer(entry) -> LayerRouting:
    if not isinstance(entry, dict):
        raise TypeError(f"a layer must be a table (name, modes, stats), got {entry!r}")
    name, modes, stats = entry["name"], entry["modes"], entry.get("stats", {})
    if not isinstance(name, str):
        raise TypeError(f"a layer's name must be a string, got {name!r}")
    if not isinstance(modes, list):
        raise TypeError(f"layer {name!r}: modes must be a list, one per head, got {modes!r}")
    if not isinstance(stats, dict):
        raise TypeError(f"layer {name!r}: stats must be a table of lists, got {stats!r}")
    for field_name, values in stats.items():
        if not isinstance(values, list) or len(values) != len(modes) or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in values):
            raise ValueError(f"layer {name!r}: stats {field_name!r} must be {len(modes)} numbers, one per head, "
                             f"got {values!r}")
    return LayerRouting(name, [Mode.parse(m) for m in modes], stats)


def _number(value, name: str, low: float, high: float | None = None, low_open: bool = False, whole: bool = False):
    kind = int if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not (value > low if low_open else value >= low) \
            or (high is not None and value > high):
        span = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        raise ValueError(f"{name} must be {'an int' if whole else 'a number'} {span}, got {value!r}")


def _check_file(r: RoutingFile) -> None:
    """The settings' kinds and ranges, and layers that make one model (names once each, one head count).
    rho, eps and query_stride may be null: a routing saved with a model (OasisVSR.save_pretrained) was not
    calibrated here."""
    if r.rho is not None:
        _number(r.rho, "rho", 0.0, 1.0)
    if r.eps is not None:
        _number(r.eps, "eps", 0.0, low_open=True)
    if r.query_stride is not None:
        _number(r.query_stride, "query_stride", 1, whole=True)
    _number(r.videos, "videos", 0, whole=True)
    if not r.layers:
        raise ValueError("no layers")
    if any(not l.modes for l in r.layers):
        raise ValueError(f"layer {next(l.name for l in r.layers if not l.modes)!r} routes no heads")
    names = [l.name for l in r.layers]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"layers named twice: {twice[:3]}")
    heads = sorted({len(l.modes) for l in r.layers})
    if len(heads) > 1:
        raise ValueError(f"layers route different numbers of heads: {heads}")
    # (what Algorithm 1 kept global; a file edited by hand may route others, so only its range is checked)
    _number(r.num_global, "num_global", 0, sum(len(l.modes) for l in r.layers), whole=True)


def _shape(r: RoutingFile) -> str:
    heads = sorted({len(l.modes) for l in r.layers})
    return f"{r.num_layers} layers of {'/'.join(map(str, heads)) or 0} heads"


def routing_agreement(a: RoutingFile, b: RoutingFile) -> float:
    """Fraction of identical (layer, head) assignments: the paper's stability measure. The files must route
    the same layers (by name, in order) with the same window: otherwise their modes mean other things."""
    if a.num_layers != b.num_layers or any(len(x.modes) != len(y.modes) for x, y in zip(a.layers, b.layers)):
        raise ValueError(f"routing files route different models ({_shape(a)} vs {_shape(b)})")
    differ = [(x.name, y.name) for x, y in zip(a.layers, b.layers) if x.name != y.name]
    if differ:
        raise ValueError(f"routing files name their layers otherwise ({len(differ)} of {a.num_layers}: "
                         f"{differ[0][0]!r} against {differ[0][1]!r} first)")
    if a.window != b.window:
        raise ValueError(f"routing files route window heads of {a.window} and {b.window}")
    pairs = [(x, y) for la, lb in zip(a.layers, b.layers) for x, y in zip(la.modes, lb.modes)]
    return sum(x == y for x, y in pairs) / len(pairs)


class RoutingCalibrator:
    """Streaming means of per-head statistics over many videos and layers."""

    def __init__(self, window=(3, 5, 5), *, eps: float = 1e-6, query_stride: int = 1, backend: str = "auto"):
        # checked here, not at the first layer of the first video the model runs
        _number(eps, "eps", 0.0, low_open=True)
        _number(query_stride, "query_stride", 1, whole=True)
        if backend not in ("auto", "triton", "reference"):  # head_statistics' backends
            raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")
        self.window = normalize_window(window)
        self.eps, self.query_stride, self.backend = eps, query_stride, backend
        self._sums: dict[str, dict[str, torch.Tensor]] = {}
        self._weights: dict[str, int] = {}

    @property
    def layers(self) -> list[str]:
        return list(self._sums)

    @property
    def videos(self) -> int:
        return max(self._weights.values(), default=0)

    def observe(self, layer: str, q: torch.Tensor, k: torch.Tensor, grid, scale: float | None = None) -> None:
        """Add one layer's q, k (``[B, N, heads, D]``, B videos) to the running means."""
        stats = head_statistics(q.detach(), k.detach(), grid, self.window, eps=self.eps,
                                query_stride=self.query_stride, scale=scale, backend=self.backend)
        means = stats.mean()
        b = q.shape[0]
        sums = self._sums.setdefault(layer, {f: torch.zeros_like(means[f], device="cpu") for f in FIELDS})
        if sums["kl_intra"].shape != means["kl_intra"].shape:
            raise ValueError(f"layer {layer!r} had {sums['kl_intra'].shape[0]} heads, now {q.shape[2]}")
        for f in FIELDS:
            sums[f] += means[f].cpu() * b
        self._weights[layer] = self._weights.get(layer, 0) + b

    def means(self) -> dict[str, dict[str, list[float]]]:
        return {name: {f: (s / self._weights[name]).tolist() for f, s in sums.items()} for name, sums in self._sums.items()}

    @contextlib.contextmanager
    def record(self, model: torch.nn.Module, layer_filter=None):
        """Observe every routed-attention call made inside matching submodules of ``model``.

        ``layer_filter(name, module) -> bool`` picks the attention layers (default: every
        module that calls attention directly). Calls must carry the grid: use
        ``routed_attention`` with a plan (an all-global plan for the unrouted model).
        """
        stack: list[str] = []
        handles = []

        def enter(name):
            def hook(module, args):
                stack.append(name)  # returns None: the module's inputs stay as they are
            return hook

        def leave(module, args, output):
            stack.pop()  # returns None: the module's output stays as it is

        for name, module in model.named_modules():
            if layer_filter is not None and not layer_filter(name, module):
                continue
            handles.append(module.register_forward_pre_hook(enter(name)))
            handles.append(module.register_forward_hook(leave))

        def observer(q, k, plan, scale):
            if stack:
                self.observe(stack[-1], q, k, plan.grid, scale)

        api.add_observer(observer)
        try:
            yield self
        finally:
            api.remove_observer(observer)
            for h in handles:
                h.remove()

    def assign(self, rho: float) -> RoutingFile:
        """Algorithm 1 over every layer and head seen so far."""
        if not self._sums:
            raise ValueError("no statistics recorded yet")
        means = self.means()
        names = self.layers
        scores = [[[a, b] for a, b in zip(means[n]["kl_intra"], means[n]["kl_window"])] for n in names]
        result = assign_heads(scores, rho)
        layers = [LayerRouting(n, list(m), means[n]) for n, m in zip(names, result.modes)]
        return RoutingFile(layers, float(rho), self.window, self.eps, self.query_stride, self.videos, result.num_global)
