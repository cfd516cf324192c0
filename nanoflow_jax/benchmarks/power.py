"""The GPU's power draw and SM clock while a region runs, sampled through NVML (GPU only).

    with PowerSampler() as power:
        run_steps()
    power.watts, power.sm_mhz  # means over the samples (None: no NVML, e.g. on the CPU)

Why: an H200 runs LLaMA-3-8B's step at its 700 W power cap, so a schedule that keeps more
units busy at once lowers the SM clock: time alone does not say whether the work got cheaper.
A thread reads NVML (the driver's libnvidia-ml, through ctypes: no extra dependency) every
`period_s` until the region ends.
"""
from __future__ import annotations

import ctypes
import threading
import time

_NVML_CLOCK_SM = 1


def _nvml():
    """The NVML library, initialised (None where there is none)."""
    try:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    return lib if lib.nvmlInit_v2() == 0 else None


class PowerSampler:
    """Samples of (watts, SM MHz) of GPU `index` taken while the `with` block runs."""

    def __init__(self, index: int = 0, period_s: float = 0.02):
        self.index, self.period_s = index, period_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self) -> PowerSampler:
        lib = _nvml()
        if lib is None:
            return self
        handle = ctypes.c_void_p()
        if lib.nvmlDeviceGetHandleByIndex_v2(self.index, ctypes.byref(handle)) != 0:
            return self

        def sample():
            milliwatts, mhz = ctypes.c_uint(), ctypes.c_uint()
            while not self._stop.is_set():
                if (lib.nvmlDeviceGetPowerUsage(handle, ctypes.byref(milliwatts)) == 0 and
                        lib.nvmlDeviceGetClockInfo(handle, _NVML_CLOCK_SM,
                                                   ctypes.byref(mhz)) == 0):
                    self.samples.append((milliwatts.value / 1e3, mhz.value))
                time.sleep(self.period_s)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def watts(self) -> float | None:
        return sum(w for w, _ in self.samples) / len(self.samples) if self.samples else None

    @property
    def sm_mhz(self) -> float | None:
        return sum(m for _, m in self.samples) / len(self.samples) if self.samples else None
