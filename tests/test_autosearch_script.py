"""scripts/autosearch.py end to end on the CPU: profile tiny-llama, search, measure."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_autosearch_script_profiles_searches_and_measures(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "NANOFLOW_JAX_CACHE": str(tmp_path),
           "PYTHONPATH": ROOT}
    out = tmp_path / "schedule.json"
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "autosearch.py"), "--model=tiny-llama",
           "--dtype=float32", "--num_tokens=64", "--token_step=32", "--shares=0.5,1.0",
           "--contexts=48", "--calls=1", "--repeats=1", "--num_decode=16",
           "--decode_context=40", "--num_nano=2", "--time_limit=10", "--measure_repeats=1",
           "--measure_pages=100", "--page_size=4", "--corun_tokens=32", "--num_layers=1",
           f"--out={out}"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    profiles = os.listdir(tmp_path / "profiles")  # the cache file `schedule="auto"` reads
    assert len(profiles) == 1 and profiles[0].startswith("cpu-float32-T64-")
    corun = json.loads((tmp_path / "profiles" / profiles[0]).read_text())["corun"]
    assert corun["tokens"] == [32] and corun["shares"] == [0.5, 1.0]
    written = json.loads(out.read_text())
    assert written["num_tokens"] == 64 and written["prediction"]["step_ms"] > 0
    assert "search: " in run.stdout and "chose" in run.stdout
    # The table: predicted and measured for sequential, the hand-written and the searched.
    table = run.stdout[run.stdout.index("schedule | predicted ms"):].splitlines()
    assert [row.split(" (")[0] for row in table[1:4]] == ["sequential", "hand-written",
                                                          "searched"]
    assert "nano2-pipe-nostreams" in table[2]
    assert all(float(row.split(" | ")[2]) > 0 for row in table[1:4])
    assert "predicted gain" in run.stdout and "guard keeps" in run.stdout


def test_autosearch_script_profiles_a_tensor_parallel_shard(tmp_path):
    """--tensor_parallel_size=2 on two host devices: the profile (keyed by the TP size) has the
    all-reduce's times, and the search runs on it."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "NANOFLOW_JAX_CACHE": str(tmp_path),
           "PYTHONPATH": ROOT, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    profile, out = tmp_path / "tp2.json", tmp_path / "schedule.json"
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "autosearch.py"), "--model=tiny-llama",
           "--dtype=float32", "--num_tokens=64", "--token_step=32", "--shares=1.0",
           "--contexts=48", "--calls=1", "--repeats=1", "--num_decode=16",
           "--decode_context=40", "--num_nano=2", "--time_limit=10", "--page_size=4",
           "--tensor_parallel_size=2", "--steps=profile,search", f"--profile={profile}",
           f"--out={out}"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    saved = json.loads(profile.read_text())
    assert saved["key"]["tensor_parallel_size"] == 2
    assert len(saved["all_reduce"]) == 2 and all(ms > 0 for ms in saved["all_reduce"])
    assert json.loads(out.read_text())["num_tokens"] == 64
