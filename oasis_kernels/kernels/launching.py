"""Launching the Triton kernels: autotuned or with the first config that fits, the direct launch
that skips Triton's host path on repeat calls, and the record of launches the C++ replay takes.

Triton's launch path (autotuner lookup, argument binding and specialization, cache key) costs
40-130 us of host time per launch on the H200's host, more than the GPU time of the kernels at
small shapes (docs/PERF.md, entries 2 and 8). So the first launch of each :func:`spec_key` goes
through Triton; the compiled kernel it returns, the config and the grid are kept, and later
launches with the same key call the compiled kernel's launcher directly (:func:`launch_compiled`),
with the arguments in signature order as ``JITFunction.run`` passes them. The key holds every
value Triton specializes on, so a hit launches exactly the kernel Triton would pick. That call
uses a private interface of Triton's compiled kernels: it is made only on the Triton versions
listed in :data:`DIRECT_VERSIONS` (elsewhere every launch takes Triton's public path, which is
slower on the host and otherwise the same), and never while a launch hook is registered.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from dataclasses import dataclass

import torch
import triton
from triton import knobs
from triton.runtime import driver

from .. import config as settings_module
from .tile_configs import INTERPRET, TUNING_KEY, fitting, prune

__all__ = ["Tuned", "Launch", "recording", "no_launch_hooks", "spec_key", "launch_compiled", "DIRECT_LAUNCH",
           "DIRECT_VERSIONS"]

#: Triton versions whose compiled-kernel launcher :func:`launch_compiled` knows how to call
DIRECT_VERSIONS = ("3.6",)


def _direct_launch_unavailable() -> str:
    """Why launches cannot skip Triton's launch path here ("" when they can)."""
    if INTERPRET:
        return "the Triton interpreter runs kernels as Python"
    version = ".".join(triton.__version__.split(".")[:2])
    if version not in DIRECT_VERSIONS:
        return f"Triton {triton.__version__}: the direct launch knows versions {', '.join(DIRECT_VERSIONS)}"
    return ""


#: why the direct launch is off ("" when it is on); the C++ replay needs it
DIRECT_UNAVAILABLE = _direct_launch_unavailable()
DIRECT_LAUNCH = not DIRECT_UNAVAILABLE


def launch_compiled(compiled, grid: tuple, arguments) -> None:
    """Launch Triton's ``compiled`` kernel on the current stream with ``arguments`` in its
    signature order (constexprs included, as ``JITFunction.run`` passes them): Triton 3.6's
    launcher with no launch metadata and no hooks. Only called when :data:`DIRECT_LAUNCH`."""
    g0, g1, g2 = grid
    stream = driver.active.get_current_stream(driver.active.get_current_device())
    compiled.run(g0, g1, g2, stream, compiled.function, compiled.packed_metadata, None, None, None, *arguments)


def no_launch_hooks() -> bool:
    """No launch hook (e.g. Triton's profiler) is registered: the direct path calls none."""
    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    return all(h is None or not getattr(h, "calls", True) for h in hooks)


def spec_key(args, kwargs) -> tuple:
    """Everything Triton specializes a launch on, and more: each tensor's dtype and 16-byte
    alignment, every int and constexpr by value (floats are plain runtime arguments)."""
    key = [a if type(a) is int else (a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a
           for a in args]
    key.extend(v for v in kwargs.values() if type(v) is not float)
    return tuple(key)


_GENERATIONS = itertools.count()


class Tuned:
    """A kernel launched with Triton's autotuner over ``configs`` (setting ``autotune``), or with
    the first config that fits (autotuning off, the interpreter, a kernel with its own ``fitting``
    rule); ``chosen`` records either choice. Repeat launches go direct (see the module's doc)."""

    def __init__(self, kernel, configs, key=TUNING_KEY, fitting_rule=None):
        self.kernel = kernel
        self.configs = configs
        self.key = key
        self.fitting = fitting_rule or fitting  # configs, launch kwargs -> the configs that suit it
        self.manual: dict = {}
        # the tile kernels are autotuned; a kernel with its own fitting rule (the delta kernel's
        # one config) is not
        self.autotuner = (triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune})(kernel)
                          if fitting_rule is None and not INTERPRET else None)
        self.direct: dict = {}

    # setting the config list or the autotuner (tests and benchmarks swap them) starts a new
    # tuning generation, which keys the direct launches and the launches the C++ replay keeps
    @property
    def configs(self):
        return self._configs

    @configs.setter
    def configs(self, value):
        self._configs = value
        self.generation = next(_GENERATIONS)

    @property
    def autotuner(self):
        return self._autotuner

    @autotuner.setter
    def autotuner(self, value):
        self._autotuner = value
        self.generation = next(_GENERATIONS)

    def launcher(self, grid, config=None, grid_key=(), autotune: bool | None = None):
        """What ``kernel[grid]`` would be: autotuned, or with ``config`` (a ``triton.Config``) or,
        without autotuning, the first config that fits. ``grid_key``: the values ``grid`` reads
        beyond the kernel's arguments (a direct launch reuses the grid of its first launch).
        ``autotune``: a prepared call's setting; None: the settings in force."""
        if autotune is None:
            autotune = settings_module.settings().autotune

        def run(*args, **kwargs):
            tune = config is None and self.autotuner is not None and autotune
            key = None
            if DIRECT_LAUNCH and no_launch_hooks():
                # with the device (a compiled kernel's function handle belongs to one), Triton's
                # debug switches, the tuning generation and whether the autotuner chooses, and the
                # forced config (the entry holds it, so its id cannot be reused while it exists)
                key = (driver.active.get_current_device(), self.generation, tune, knobs.runtime.debug,
                       knobs.compilation.instrumentation_mode, id(config), grid_key, spec_key(args, kwargs))
                hit = self.direct.get(key)
                if hit is not None and hit[4] is config:
                    _record(self.kernel, hit, args, kwargs)
                    launch_compiled(hit[0], hit[1], (*args, *_tail(hit, kwargs)))
                    return hit[0]
            if tune:
                compiled = self.autotuner[grid](*args, **kwargs)
                cfg = self.autotuner.best_config
            else:
                cfg = config or self.fitting(self.configs, kwargs)[0]
                if config is None:
                    self.manual[(*(kwargs[k] for k in self.key), kwargs.get("DOT_PREC"))] = cfg
                launch = grid({**kwargs, **cfg.kwargs}) if callable(grid) else grid
                compiled = self.kernel[launch](*args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps,
                                               num_stages=cfg.num_stages)
            if key is not None and compiled is not None:
                self._remember(key, compiled, cfg, grid, args, kwargs, config)
            _record(self.kernel, None if key is None else self.direct.get(key), args, kwargs)
            return compiled

        return run

    def _remember(self, key, compiled, cfg, grid, args, kwargs, config):
        names = self.kernel.arg_names[len(args):]
        fixed = {**kwargs, **cfg.kwargs}
        if not all(n in fixed for n in names):  # an argument left to its default: keep Triton's path
            return
        launch = grid(fixed) if callable(grid) else grid
        launch = tuple(launch) + (1,) * (3 - len(launch))
        if len(self.direct) > 256:
            self.direct.clear()
        self.direct[key] = (compiled, launch, names, cfg.kwargs, config)

    def chosen(self) -> dict:
        cache = dict(self.manual)
        if self.autotuner is not None:
            cache.update(self.autotuner.cache)
        return {str(k): str(v) for k, v in cache.items()}


def _tail(hit, kwargs) -> list:
    """The arguments after the positional ones, in signature order: keywords, then the config's."""
    names, cfg_kwargs = hit[2], hit[3]
    return [kwargs[n] if n in kwargs else cfg_kwargs[n] for n in names]


_RECORDING = threading.local()


@contextlib.contextmanager
def recording():
    """Collect every launch of this thread made in the block, for :mod:`oasis_kernels.fastpath`:
    a list of :class:`Launch`, or ``None`` for a launch that went through Triton's own path
    (no direct-launch entry: a launch hook, a Triton version the direct launch does not know)."""
    launches: list = []
    previous = getattr(_RECORDING, "launches", None)
    _RECORDING.launches = launches
    try:
        yield launches
    finally:
        _RECORDING.launches = previous


@dataclass(frozen=True)
class Launch:
    """One launch as Triton's launcher made it: the compiled kernel, the grid, and every
    argument by name in the kernel's order (constexprs included)."""

    compiled: object
    grid: tuple
    arguments: tuple

    def parameters(self):
        """``[(name, Triton type, value)]`` of the kernel's parameters, constexprs left out, in
        the order the compiled kernel takes them (Triton appends two scratch pointers)."""
        signature = self.compiled.src.signature
        return [(name, signature[name], value) for name, value in self.arguments if signature[name] != "constexpr"]


def _record(kernel, hit, args, kwargs) -> None:
    launches = getattr(_RECORDING, "launches", None)
    if launches is None:
        return
    if hit is None:
        launches.append(None)
        return
    launches.append(Launch(hit[0], hit[1], tuple(zip(kernel.arg_names, (*args, *_tail(hit, kwargs))))))
