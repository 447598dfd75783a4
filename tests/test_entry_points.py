"""The README's entry points as a user runs them: the demo (self-spawning and under the torchrun launcher) and the
console script. Each must exit 0 and show both the all-reduce and the sequence-parallel form (``--sp-min-tokens`` pins
the switch, so the same token counts cross it on a CPU and on a GPU machine, whose tables differ)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p.stdout


def test_demo_self_spawned_crosses_the_sp_threshold():
    out = _run([sys.executable, "-m", "tpfuse.demo", "--tokens", "1,7,1500", "--sp-min-tokens", "1024"])
    assert "transformers LlamaForCausalLM" in out and "decode=" in out  # the HF model, prefill + decode
    assert "allreduce" in out and "sequence_parallel" in out
    assert "all token counts match the unsharded model" in out
    assert out.count(" ok") == 3


def test_demo_under_launcher_tp4_uneven_tokens():
    out = _run(["bash", "launch/run.sh", "-n", "4", "-m", "tpfuse.demo", "--tokens", "3,1027", "--layers", "1",
                "--sp-min-tokens", "1024", "--model", "builtin"])
    assert "TP=4" in out and "sequence_parallel" in out and "built-in" in out
    assert "all token counts match the unsharded model" in out


def test_launcher_rejects_missing_target():
    p = subprocess.run(["bash", "launch/run.sh", "-n", "2"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and "missing TARGET" in p.stderr
