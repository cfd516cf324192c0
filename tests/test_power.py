"""PowerSampler: NVML samples on a GPU machine; none, and no error, where there is no NVML.
And the sustained timer the power runs use."""
import time

from nanoflow_jax.benchmarks import power


def test_sampler_without_nvml_has_no_samples(monkeypatch):
    monkeypatch.setattr(power, "_nvml", lambda: None)
    with power.PowerSampler() as sampler:
        time.sleep(0.01)
    assert sampler.samples == [] and sampler.watts is None and sampler.sm_mhz is None


def test_means_of_the_samples():
    sampler = power.PowerSampler()
    sampler.samples = [(600.0, 1500), (700.0, 1700)]
    assert sampler.watts == 650.0 and sampler.sm_mhz == 1600.0


def test_sustained_ms_per_call_runs_every_call_and_keeps_none():
    from nanoflow_jax.benchmarks.timing import sustained_ms_per_call

    calls = []
    ms = sustained_ms_per_call(lambda x: calls.append(x) or x, 3, calls=5)
    assert calls == [3] * 5 and ms >= 0
