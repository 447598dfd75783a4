"""One-GPU mode and the process-group setup around it (:mod:`tpfuse.distributed`, :mod:`tpfuse.collectives`), on
any machine: the switch and its errors, ``init_distributed`` without torchrun, the gloo side of the collectives
that one-GPU mode stages through host memory, and ``TPCommunicator.graph_safe``. The kernels themselves in one-GPU
mode are the GPU suite's (``harness`` backend ``onegpu``, ``cases.GPU_TPS``)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import tpfuse
from harness import run_on_ranks
from tpfuse import collectives
from tpfuse import distributed as td

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        td.ONE_GPU_ENV)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def test_init_distributed_without_torchrun_is_one_rank():
    code = ("import tpfuse, torch.distributed as d; b = tpfuse.init_distributed(backend='gloo'); "
            "print(b, d.get_rank(), d.get_world_size()); d.destroy_process_group()")
    p = subprocess.run([sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[-3:] == ["gloo", "0", "1"], p.stdout


def test_partial_torchrun_environment_is_refused():
    code = "import tpfuse; tpfuse.init_distributed()"
    p = subprocess.run([sys.executable, "-c", code], env=_clean_env(RANK="0"), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode != 0 and "partial torchrun environment" in p.stderr and "MASTER_ADDR" in p.stderr, p.stderr


def test_one_gpu_mode_errors_come_before_any_process_group(monkeypatch):
    assert not dist.is_initialized()
    with pytest.raises(tpfuse.TPFuseError, match="over gloo"):
        tpfuse.init_distributed(backend="nccl", one_gpu=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(td.ONE_GPU_ENV, raising=False)
    with pytest.raises(tpfuse.TPFuseError, match="needs a CUDA GPU"):
        tpfuse.init_distributed(one_gpu=True)
    assert not dist.is_initialized() and td.ONE_GPU_ENV not in os.environ


def test_group_device_follows_the_mode(monkeypatch):
    monkeypatch.delenv(td.ONE_GPU_ENV, raising=False)
    assert td.group_device("gloo") == torch.device("cpu") and td.default_backend(1) in ("gloo", "nccl")
    monkeypatch.setenv(td.ONE_GPU_ENV, "1")
    assert td.default_backend(1) == "gloo"  # NCCL refuses two ranks on one device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert td.group_device("gloo") == torch.device("cuda", 0)


def test_ranks_per_device_sizes_persistent_grids(monkeypatch):
    """The persistent kernels' grid divisor: 1 off the mode; ceil(local ranks / GPUs) in it (MPS residency)."""
    monkeypatch.delenv(td.ONE_GPU_ENV, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert td.ranks_per_device() == 1
    monkeypatch.setenv(td.ONE_GPU_ENV, "1")
    assert td.ranks_per_device() == 8
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert td.ranks_per_device() == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert td.ranks_per_device() == 1
    # several jobs on one GPU: each sizes its grid for the processes of all (never fewer than its own)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv(td.ONE_GPU_PROCESSES_ENV, "16")
    assert td.ranks_per_device() == 16
    monkeypatch.setenv(td.ONE_GPU_PROCESSES_ENV, "4")
    assert td.ranks_per_device() == 8
    for bad in ("0", "two"):
        monkeypatch.setenv(td.ONE_GPU_PROCESSES_ENV, bad)
        with pytest.raises(ValueError, match="TPFUSE_ONE_GPU_PROCESSES"):
            td.ranks_per_device()
    monkeypatch.delenv(td.ONE_GPU_PROCESSES_ENV)
    from tpfuse.backends.fused_allreduce import persistent_grid

    # a program per SM alone on a GPU; shared: half the SMs split among the ranks (H100: 132 SMs)
    assert [persistent_grid(132, n) for n in (1, 2, 4, 8)] == [132, 33, 16, 8]
    assert persistent_grid(3, 8) == 1


def test_launcher_switch_sets_the_mode(tmp_path):
    script = tmp_path / "show.py"
    script.write_text(f"import os; print('mode', os.environ.get({td.ONE_GPU_ENV!r}))\n")
    p = subprocess.run(["bash", os.path.join(ROOT, "launch", "run.sh"), "-n", "1", "--one-gpu", str(script)],
                       env=_clean_env(), capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert p.returncode == 0 and "mode 1" in p.stdout, p.stdout + p.stderr


def _collectives(rank, world):
    g = dist.group.WORLD
    x = torch.arange(6, dtype=torch.bfloat16).view(3, 2) + 10 * rank
    keep = x.clone()
    out = torch.empty(3 * world, 2, dtype=torch.bfloat16)
    collectives.all_gather_into_(out, x, g)
    assert torch.equal(out, torch.cat([torch.arange(6, dtype=torch.bfloat16).view(3, 2) + 10 * r
                                       for r in range(world)]))
    full = torch.arange(2 * world * 2, dtype=torch.float32).view(2 * world, 2) * (rank + 1)
    before = full.clone()
    mine = torch.empty(2, 2)
    collectives.reduce_scatter_(mine, full, g)
    tri = world * (world + 1) // 2  # sum over ranks of (rank + 1)
    assert torch.equal(mine, before[2 * rank: 2 * rank + 2] / (rank + 1) * tri)
    assert torch.equal(full, before)  # the input is never written
    y = collectives.all_reduce_(x.clone(), g)
    assert torch.equal(y, sum(keep - 10 * rank + 10 * r for r in range(world)))
    t = torch.full((4,), float(rank))
    collectives.broadcast_(t, 0, g)
    assert torch.equal(t, torch.zeros(4))
    collectives.barrier(g, torch.device("cpu"))
    return True


@pytest.mark.parametrize("world", [2, 4])
def test_collectives_on_gloo(world):
    assert run_on_ranks(_collectives, world) == [True] * world


def _graph_safe(rank, world):
    comm = tpfuse.TPCommunicator(max_tokens=64, hidden_size=64, dtype=torch.float32)
    assert comm.graph_safe(1)  # host tensors: nothing is staged
    comm._host_staged = True  # as in one-GPU mode: the CPU plan's reference path would be host collectives
    assert comm.plan(1).path("fused_add_rmsnorm") == "reference" and not comm.graph_safe(1)
    assert not comm.graph_safe(1, ops=("all_gather",))
    comm.close()
    return True


def test_graph_safe_refuses_host_staged_paths():
    assert run_on_ranks(_graph_safe, 2) == [True, True]
