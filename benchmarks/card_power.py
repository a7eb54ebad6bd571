"""The card's energy, power and SM clock while a benchmark runs, read from NVML (libnvidia-ml, no pynvml needed).

A 720p VAE decode draws the card's whole power limit and runs with its SM clock held under the maximum
(docs/PERF.md entry 18z): its time then follows its energy, and a call timed after the card sat idle runs
faster than the same call in a loop. Benchmarks report what the card did during their timed calls:

    torch.cuda.synchronize()  # nothing queued from before counted in the window
    with CardMeter(device) as meter:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    meter.summary(calls=reps)  # {"J_per_call", "W", "sm_MHz": [min, median, max], "limit_W", ...}

The energy is NVML's counter read as the context opens and closes: drain the GPU before opening it, and keep
the window long (seconds) against the counter's update interval. Where NVML is missing (no NVIDIA driver
library) the meter records nothing and ``summary`` says why.
"""

from __future__ import annotations

import ctypes
import statistics
import threading
import time

import torch

NVML_CLOCK_SM = 1
NVML_TEMPERATURE_GPU = 0


class Nvml:
    """One device's NVML handle: its energy counter (mJ since the driver loaded), SM clock (MHz), power (W, the
    driver's running average), temperature (C) and power limit (W)."""

    def __init__(self, device: torch.device | int | None = None):
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        if self.lib.nvmlInit_v2() != 0:
            raise RuntimeError("nvmlInit failed")
        self.handle = ctypes.c_void_p()
        index = torch.cuda._get_nvml_device_index(device)
        if self.lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(self.handle)) != 0:
            raise RuntimeError(f"NVML has no device {index}")

    def _uint(self, fn, *args) -> int:
        v = ctypes.c_uint()
        if fn(self.handle, *args, ctypes.byref(v)) != 0:
            raise RuntimeError(f"{fn.__name__} failed")
        return v.value

    def energy_mj(self) -> int:
        e = ctypes.c_ulonglong()
        if self.lib.nvmlDeviceGetTotalEnergyConsumption(self.handle, ctypes.byref(e)) != 0:
            raise RuntimeError("nvmlDeviceGetTotalEnergyConsumption failed")
        return e.value

    def sm_mhz(self) -> int:
        return self._uint(self.lib.nvmlDeviceGetClockInfo, NVML_CLOCK_SM)

    def watts(self) -> float:
        return self._uint(self.lib.nvmlDeviceGetPowerUsage) / 1e3

    def celsius(self) -> int:
        return self._uint(self.lib.nvmlDeviceGetTemperature, NVML_TEMPERATURE_GPU)

    def limit_watts(self) -> float:
        return self._uint(self.lib.nvmlDeviceGetEnforcedPowerLimit) / 1e3


class CardMeter:
    """A context: the energy the card used inside it (NVML's counter), and its SM clock, power and temperature
    sampled every ``period`` seconds by a thread."""

    def __init__(self, device: torch.device | int | None = None, period: float = 0.02):
        self.period = period
        self.samples: list[tuple[int, float, int]] = []
        self.error = None
        try:
            self.nvml = Nvml(device)
        except (OSError, RuntimeError, AttributeError) as e:  # no driver library, or an old one
            self.nvml, self.error = None, f"NVML unavailable: {e}"
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.wait(self.period):
            try:
                self.samples.append((self.nvml.sm_mhz(), self.nvml.watts(), self.nvml.celsius()))
            except RuntimeError as e:
                self.error = str(e)
                return

    def __enter__(self):
        if self.nvml is not None:
            self._e0, self._t0 = self.nvml.energy_mj(), time.perf_counter()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.nvml is not None:
            self._stop.set()
            self._thread.join()
            self.seconds = time.perf_counter() - self._t0
            self.joules = (self.nvml.energy_mj() - self._e0) / 1e3
        return False

    def summary(self, calls: int = 1) -> dict:
        """Joules per call and the mean power over the context, the sampled SM clock, power and temperature
        ``[min, median, max]``, the enforced power limit; ``{"error": ...}`` where nothing was measured."""
        if self.nvml is None or not hasattr(self, "joules"):
            return {"error": self.error or "not measured"}
        out = {"J_per_call": self.joules / max(calls, 1), "W": self.joules / self.seconds,
               "limit_W": self.nvml.limit_watts(), "samples": len(self.samples)}
        for name, col in zip(("sm_MHz", "sampled_W", "C"), zip(*self.samples) if self.samples else ()):
            out[name] = [min(col), statistics.median(col), max(col)]
        return out


def describe(s: dict) -> str:
    """One line of a :meth:`CardMeter.summary`, for reports."""
    if "error" in s:
        return s["error"]
    clock = s.get("sm_MHz")
    return (f"{s['J_per_call']:.1f} J a call, {s['W']:.0f} W (limit {s['limit_W']:.0f})"
            + (f", SM {clock[0]:.0f}-{clock[2]:.0f} MHz (median {clock[1]:.0f})" if clock else ""))
