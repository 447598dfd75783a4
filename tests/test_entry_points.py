"""The README's entry points as a user runs them: the demo (self-spawning and under the torchrun launcher) and the
console script. Each must exit 0 and show both the all-reduce and the sequence-parallel form (``--sp-min-tokens`` pins
the switch, so the same token counts cross it on a CPU and on a GPU machine, whose tables differ)."""

import os
import subprocess
import sys

import pytest

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
                "--sp-min-tokens", "1024", "--decode-steps", "1"])
    assert "TP=4" in out and "sequence_parallel" in out and "decode=" in out
    assert "all token counts match the unsharded model" in out


def test_launcher_rejects_missing_target():
    p = subprocess.run(["bash", "launch/run.sh", "-n", "2"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and "missing TARGET" in p.stderr


def test_exit_rank_flushes_and_keeps_the_status():
    # stdout is a pipe here and PYTHONUNBUFFERED is unset, so the text sits in Python's buffer until exit_rank
    # flushes it: os._exit alone would drop it (the demo's table is printed just before its ranks exit).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    code = "import sys; from tpfuse.distributed import exit_rank; print('table'); sys.stderr.write('err'); exit_rank(3)"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert (p.returncode, p.stdout, p.stderr) == (3, "table\n", "err")


def test_demo_reports_which_rank_failed():
    # ranks that raise (here the thresholds table named in the environment does not exist, which only the ranks
    # see) fail the demo, each exit status named
    env = dict(os.environ, TPFUSE_THRESHOLDS="/nonexistent/table.json")
    out = subprocess.run([sys.executable, "-m", "tpfuse.demo", "--tokens", "1", "--layers", "1"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out
    assert "tpfuse demo: failed: rank 0 exited 1, rank 1 exited 1" in out.stderr, out.stderr
    assert "ThresholdsError: thresholds table not found: /nonexistent/table.json" in out.stderr, out.stderr


@pytest.mark.parametrize("args,msg", [
    (["--tokens", "abc"], "argument --tokens: expected comma-separated positive ints, got 'abc'"),
    (["--tokens", "4,0"], "token counts must be >= 1"),
    (["--nproc", "3"], "--nproc 3: the demo model shards over a power-of-two TP only"),
    (["--nproc", "0"], "argument --nproc: must be in [1, 64], got 0"),
    (["--sp-min-tokens", "-5"], "argument --sp-min-tokens: must be >= 1, got -5"),
])
def test_demo_rejects_bad_arguments_before_any_rank(args, msg):
    p = subprocess.run([sys.executable, "-m", "tpfuse.demo", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2, p
    assert p.stderr.count("\n") == 1 and msg in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert p.stdout == "", p.stdout  # no rank printed anything: none started


def test_help_texts_render_cleanly():
    demo = subprocess.run([sys.executable, "-m", "tpfuse.demo", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert demo.returncode == 0 and "usage: tpfuse-demo" in demo.stdout
    assert "``" not in demo.stdout and ":func:" not in demo.stdout, demo.stdout
    run = subprocess.run(["bash", "launch/run.sh", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.startswith("Run a tpfuse entry point")
    assert "set -euo" not in run.stdout and not any(ln.startswith("#") for ln in run.stdout.splitlines()), run.stdout
    tune = subprocess.run(["bash", "launch/tune.sh", "-n", "2", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert tune.returncode == 0 and tune.stdout.count("usage: tune.py") == 1, tune.stdout + tune.stderr


def test_tuner_rejects_bad_arguments_before_any_rank():
    p = subprocess.run(["bash", "launch/tune.sh", "-n", "2", "--ops", "fused_add_rmsnorm,bogus"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "cannot tune ['bogus']" in p.stderr, p.stderr
    assert p.stdout == "", p.stdout


def test_generate_cli_prints_speed_and_rejects_bad_args():
    out = _run([sys.executable, "-m", "tpfuse.generate_cli", "--batch", "2", "--prompt-len", "6", "--new-tokens", "5"])
    assert "ms/step" in out and "tokens/s" in out and "KV cache" in out, out
    bad = subprocess.run([sys.executable, "-m", "tpfuse.generate_cli", "--new-tokens", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--new-tokens must be >= 1" in bad.stderr, bad
