"""Shared benchmark plumbing: the results header (device, commit, versions, date), timing, output paths.

Every benchmark writes ``{"header": header(...), "rows": [...]}`` under ``bench/results/``. Timing on GPU uses
CUDA graphs of ``calls`` back-to-back calls, replayed many times, median per call (METHOD.md: warm up first,
median of many, graphs to hide launch gaps); on CPU, the median wall time of repeated calls.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Optional

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def git_commit() -> str:
    """The commit the benchmarked code came from: ``$TPFUSE_COMMIT`` (set where .git is absent, e.g. the GPU
    machine's copy of the tree) or ``git rev-parse HEAD`` (with ``+dirty`` if the tree has changes)."""
    if os.environ.get("TPFUSE_COMMIT"):
        return os.environ["TPFUSE_COMMIT"]
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def device_slug() -> str:
    """Short file-name tag: ``h200``, ``h100``, ``cpu``."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    for tag in ("h200", "h100", "b200", "gb200", "a100", "l40s"):
        if tag in name:
            return tag
    return name.replace("nvidia ", "").replace(" ", "-")


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
        try:
            out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:
            pass
    for mod in ("triton", "flashinfer", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            pass
    import tpfuse

    out["tpfuse"] = tpfuse.__version__
    return out


def header(benchmark: str, **extra) -> dict:
    h = {"benchmark": benchmark, "device": device_name(), "device_count": torch.cuda.device_count(),
         "commit": git_commit(), "versions": versions(),
         "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    h.update(extra)
    return h


def write_json(path: str, header_: dict, rows: list) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"header": header_, "rows": rows}, f, indent=1)
    return path


def slowest_rank(value: float, device) -> float:
    """The largest ``value`` over the ranks of the default group (a step costs what its slowest rank takes);
    ``value`` itself on one rank or without a process group."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return float(value)
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def time_us(fn: Callable[[], object], *, calls: int = 10, replays: int = 30, use_graph: Optional[bool] = None,
            barrier: Optional[Callable[[], None]] = None) -> tuple:
    """Median microseconds per call of ``fn`` and the mode used (``"graph"``, ``"events"`` or ``"wall"``).

    GPU: capture ``calls`` calls in a CUDA graph (falls back to events around eager calls if capture fails),
    replay ``replays`` times, median per call. CPU: median wall time of ``replays`` calls. ``barrier`` (e.g.
    ``dist.barrier``) runs before each measurement so ranks start together."""
    on_gpu = torch.cuda.is_available() and torch.cuda.is_initialized()
    if not on_gpu:
        fn()
        samples = []
        for _ in range(replays):
            if barrier:
                barrier()
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(samples), "wall"
    fn()
    torch.cuda.synchronize()
    mode = "graph"
    graph = None
    if use_graph is not False:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    fn()
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(calls):
                    fn()
        except Exception:
            graph, mode = None, "events"
            torch.cuda.synchronize()
    else:
        mode = "events"
    samples = []
    for _ in range(replays):
        if barrier:
            barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        if graph is not None:
            graph.replay()
        else:
            for _ in range(calls):
                fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(samples), mode


def plot_ratio_panels(path: str, rows: list, *, panel: tuple, x: str, y: str, baseline: str, ylabel: str,
                      title: str, xlabel=None, refs=(1.0,)) -> Optional[str]:
    """One panel per distinct ``panel`` key (row fields), one line per provider: ``y`` divided by the
    ``baseline`` provider's ``y`` at the same ``x``; dashed lines at ``refs``. ``xlabel``: a string, or a function
    of the panel key. Returns the path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = sorted({tuple(r[f] for f in panel) for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        sel = [r for r in rows if tuple(r[f] for f in panel) == key]
        base = {r[x]: r[y] for r in sel if r["provider"] == baseline}
        for prov in sorted({r["provider"] for r in sel} - {baseline}):
            pts = sorted((r[x], r[y] / base[r[x]]) for r in sel if r["provider"] == prov and r[x] in base)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=prov)
        for i, ref in enumerate(refs):
            ax.axhline(ref, color="k" if i == 0 else "gray", lw=0.8, ls="-" if i == 0 else "--")
        ax.set(xscale="log", xlabel=xlabel(key) if callable(xlabel) else (xlabel or x), ylabel=ylabel,
               title=" ".join(map(str, key)))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
