"""PowerSampler: NVML samples on a GPU machine; none, and no error, where there is no NVML."""
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
