"""scripts/generate.py, the README's offline command, works on a tiny preset."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_generate_script_greedy_and_sampled():
    cmd = [sys.executable, "scripts/generate.py", "--model=tiny-llama", "--dtype=float32",
           "--max_tokens=5", "--max_num_batched_tokens=32", "--max_model_len=128",
           "--prompt=Hello", "--prompt=Bonjour", "--chat", "--n=2", "--temperature=0.8",
           "--seed=3"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if " -> " in line]
    assert len(lines) == 4  # two prompts, two samples each
    for line in lines:  # a sampled EOS may end a sample early: then it says "stop"
        assert "(5 tokens, length)" in line or re.search(r"\([0-4] tokens, stop\)$", line)
    assert lines[0].startswith("'Hello' -> ") and lines[2].startswith("'Bonjour' -> ")
