"""Shared benchmark plumbing: the one harness every script in ``bench/`` runs on.

* **Rank context** (:func:`rank_context`): the process group and this rank's device for a script run under
  ``torchrun`` (or a one-process group of its own), torn down when the script's body returns.
* **One timer** (:func:`time_us`): on GPU a CUDA graph of ``calls`` back-to-back calls (each call may be its own
  callable, e.g. rotating over input copies), warmed up, replayed ``replays`` times (or as many as fit in
  ``target_s``), median per call from CUDA events; on CPU the median wall time of repeated calls (METHOD.md: warm
  up first, median of many, graphs to hide launch gaps). Multi-rank timings report the slowest rank
  (:func:`slowest_rank`). The memory-bound ceiling: the faster way of :func:`copy_bandwidths`.
* **Cases x providers** (:class:`Case`, :func:`run_cases`): a benchmark is a sequence of cases, each a dict of
  provider name -> callable; one loop times every provider of every case and turns the timings into rows.
* **One output rule** (:func:`out_dir`, :func:`result_path`, :func:`write_json`): results go to ``--out-dir`` when
  given, else ``$OUT`` (the GPU machine's return folder), else ``bench/results``, named
  ``<bench>[_tp<N>]_<device>[_<tag>].json`` (plots: the same stem, ``.png``), as
  ``{"header": header(...), "rows": [...]}`` with the header (device, commit, versions, date) from :func:`header`.
* **Shared eager baselines** (:func:`eager_rmsnorm`, :func:`eager_add_rmsnorm`, :func:`eager_quant`): the torch
  ops a user writes, used by every benchmark that compares against them.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# --------------------------------------------------------------------------------------------------------------
# header


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
    """The results header every benchmark writes: benchmark, device, device count, commit, versions, date (UTC),
    plus the benchmark's own ``extra`` fields."""
    h = {"benchmark": benchmark, "device": device_name(), "device_count": torch.cuda.device_count(),
         "commit": git_commit(), "versions": versions(),
         "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    h.update(extra)
    return h


# --------------------------------------------------------------------------------------------------------------
# output


def out_dir(explicit: Optional[str] = None) -> str:
    """Where results go: ``explicit`` (a script's ``--out-dir``), else ``$OUT`` (the GPU machine's return
    folder, set by bench/gpu_run.sh), else ``bench/results``."""
    return explicit or os.environ.get("OUT") or RESULTS


def result_path(bench: str, *, tp: Optional[int] = None, tag: str = "", ext: str = "json",
                directory: Optional[str] = None, device: Optional[str] = None) -> str:
    """``<dir>/<bench>[_tp<N>]_<device>[_<tag>].<ext>``: the one naming rule of bench/results (``tp`` for
    multi-rank benchmarks, ``tag`` for a variant of the configuration; a leading ``_`` of ``tag`` is dropped)."""
    tag = tag.lstrip("_")
    name = bench + (f"_tp{tp}" if tp else "") + f"_{device or device_slug()}" + (f"_{tag}" if tag else "")
    return os.path.join(out_dir(directory), f"{name}.{ext}")


def write_json(path: str, header_: dict, rows: Optional[list] = None, **sections) -> str:
    """Write ``{"header": header_, "rows": rows, **sections}`` to ``path`` (folders created); returns ``path``.
    ``rows=None`` leaves the ``rows`` key out (results made of other sections)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data = {"header": header_}
    if rows is not None:
        data["rows"] = rows
    data.update(sections)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    return path


# --------------------------------------------------------------------------------------------------------------
# ranks


@dataclass(kw_only=True)
class Ranks:
    """This process's place in the default process group."""

    rank: int
    """Global rank."""
    world: int
    """Number of ranks (the TP degree of the benchmarks)."""
    device: torch.device
    """This rank's device: ``cuda:<LOCAL_RANK>`` under NCCL, the shared GPU in one-GPU mode, ``cpu`` under gloo."""
    backend: str
    """``nccl`` or ``gloo``."""

    @property
    def group(self):
        import torch.distributed as dist

        return dist.group.WORLD

    def barrier(self) -> None:
        """Device work done here, then every rank at the same point (ranks start a measurement together)."""
        import torch.distributed as dist

        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()


@contextlib.contextmanager
def rank_context(backend: Optional[str] = None, *, timeout_s: float = 120.0,
                 single_process: bool = False) -> Iterator[Ranks]:
    """The default process group from torchrun's environment and this rank's device (``torch.cuda.set_device``
    under NCCL); on leaving the block, a barrier and ``destroy_process_group``. ``single_process``: without
    torchrun's environment, a one-rank group of this process. An exception in the block skips the teardown (a
    barrier would wait for ranks that may never arrive); the launcher ends the other ranks."""
    import torch.distributed as dist
    from tpfuse.distributed import free_port, group_device, init_distributed

    if single_process and "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    backend = init_distributed(backend, timeout_s=timeout_s)
    dev = group_device(backend)  # CUDA on NCCL, and on gloo in one-GPU mode
    yield Ranks(rank=dist.get_rank(), world=dist.get_world_size(), device=dev, backend=backend)
    dist.barrier()
    dist.destroy_process_group()


def slowest_rank(value: float, device) -> float:
    """The largest ``value`` over the ranks of the default group (a step costs what its slowest rank takes);
    ``value`` itself on one rank or without a process group."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return float(value)
    from tpfuse import collectives

    t = torch.tensor([value], dtype=torch.float64, device=device)
    collectives.all_reduce_(t, None, dist.ReduceOp.MAX)  # one-GPU mode: a CUDA tensor on a gloo group
    return float(t.item())


# --------------------------------------------------------------------------------------------------------------
# timing


def _capture(fns: Sequence[Callable[[], object]]):
    """A CUDA graph of ``fns`` called in turn, after warm-up calls on a side stream (allocator and autotuning
    settle outside the graph) and one warm replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in (list(fns) * 3)[:3]:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def _wall_us(fns, replays, barrier) -> float:
    fns[0]()
    samples = []
    for i in range(replays):
        if barrier:
            barrier()
        t0 = time.perf_counter()
        fns[i % len(fns)]()
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def time_us(fn: Union[Callable[[], object], Sequence[Callable[[], object]]], *, calls: int = 10, replays: int = 30,
            use_graph: Optional[bool] = None, barrier: Optional[Callable[[], None]] = None,
            target_s: Optional[float] = None, max_replays: int = 200) -> tuple:
    """Median microseconds per call of ``fn`` and the mode used (``"graph"``, ``"events"`` or ``"wall"``).

    ``fn``: one callable (called ``calls`` times per measurement) or a list of callables (one measurement calls
    each once, in turn; ``calls`` is then their number), e.g. the same op over input copies that together exceed
    L2. GPU: one eager call, then ``calls`` calls captured in a CUDA graph (``use_graph=None``: falls back to
    events around eager calls if capture fails; ``True``: a failed capture raises; ``False``: events only),
    replayed ``replays`` times -- or, with ``target_s``, as many times as fit in about ``target_s`` seconds,
    within ``[replays, max_replays]`` -- median per call. CPU: median wall time of ``replays`` single calls.
    ``barrier`` (e.g. ``dist.barrier``) runs before each measurement so ranks start together."""
    fns = list(fn) if isinstance(fn, (list, tuple)) else [fn] * calls
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return _wall_us(fns, replays, barrier), "wall"
    fns[0]()
    torch.cuda.synchronize()
    graph = None
    if use_graph is not False:
        try:
            graph = _capture(fns)
        except Exception:
            if use_graph:
                raise
            torch.cuda.synchronize()

    def once():
        if graph is not None:
            graph.replay()
        else:
            for f in fns:
                f()

    if target_s is not None:  # calibrate the number of replays to about target_s of measuring
        t0 = time.perf_counter()
        once()
        torch.cuda.synchronize()
        replays = int(min(max_replays, max(replays, target_s / max(time.perf_counter() - t0, 1e-6))))
    samples = []
    for _ in range(replays):
        if barrier:
            barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        once()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / len(fns))
    return statistics.median(samples), ("graph" if graph is not None else "events")


def copy_bandwidths(dev, nbytes: int = 1 << 30) -> dict:
    """Device-to-device copy bandwidth of ``dev`` in bytes per second, counting each byte read and written
    (``2 * nbytes / time``), measured two ways: ``"graph"``, the median over graph replays of two back-to-back
    copies (:func:`time_us`); ``"events"`` (GPU only), the median of 20 eager copies, each between two CUDA events,
    after 3 warm-ups. On CPU, ``{"graph": ...}`` from wall time.

    Why both: the ceiling must be one the device really reaches. On one H100 the graph way gave 2.42 TB/s
    (``bench/results/e2e_tp1_h100_full_14a3f4c.json``) while that run's bf16 decode step read its own bytes at
    2.49 TB/s, so a floor at that bandwidth was no floor; the eager way is the one #22's 3.02 TB/s came from.
    The ceiling a benchmark states its bandwidth against is the faster of the two (``max`` of the values); it
    records both."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    out = {"graph": 2 * nbytes / (time_us([lambda: dst.copy_(src)] * 2, use_graph=True, replays=10)[0] * 1e-6)}
    if torch.device(dev).type == "cuda":
        samples = []
        with torch.cuda.device(dev):  # the events on dev's current stream, whatever device is current
            for i in range(23):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                dst.copy_(src)
                end.record()
                end.synchronize()
                if i >= 3:
                    samples.append(start.elapsed_time(end) * 1e-3)
        out["events"] = 2 * nbytes / statistics.median(samples)
    return out


# --------------------------------------------------------------------------------------------------------------
# cases x providers


@dataclass(kw_only=True)
class Case:
    """One point of a benchmark: what identifies it and the providers timed at it."""

    fields: dict
    """Row fields naming the case (e.g. ``{"op": ..., "tokens": ..., "hidden": ...}``)."""
    providers: dict
    """Provider name -> the step to time: a zero-argument callable, or a list of them (see :func:`time_us`)."""
    extra: dict = field(default_factory=dict)
    """Whatever the script's row function needs besides the timing (e.g. bytes moved per call)."""
    timing: dict = field(default_factory=dict)
    """Options of :func:`time_providers` for this case only (e.g. fewer ``calls`` for a large GEMM), over the
    run's."""


@dataclass(kw_only=True)
class Timing:
    """One provider's measurement at one case."""

    us: float
    """Median µs per call (over ``rounds``: the median of the round values)."""
    rounds_us: list
    """Each round's value (the slowest rank's median when timed over ranks)."""
    mode: str
    """``graph``, ``events``, ``wall``, or ``error: ...`` when the provider raised (``us`` is then NaN)."""


def time_providers(providers: dict, *, rounds: int = 1, device=None, before: Optional[Callable[[], None]] = None,
                   **timer_kw) -> dict:
    """``{name: Timing}``: every provider timed ``rounds`` times, the order rotated by one each round (clock or
    power drift over a round lands on every provider alike). ``device``: take the slowest rank's value each
    round (collective: every rank must time the same providers). ``before``: runs before each provider's timing
    (e.g. a barrier once per measurement, where ``time_us``'s ``barrier`` would run before every replay). A
    provider that raises is recorded with NaN and its error as the mode (after a device sync), so every rank
    stays in step."""
    keys = list(providers)
    per_round, modes = {k: [] for k in keys}, {}
    for rnd in range(rounds):
        for k in keys[rnd % len(keys):] + keys[:rnd % len(keys)]:
            if before is not None:
                before()
            try:
                us, modes[k] = time_us(providers[k], **timer_kw)
            except Exception as ex:  # noqa: BLE001 - reported in the row, not fatal
                us, modes[k] = float("nan"), f"error: {type(ex).__name__}: {ex}"[:200]
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
            per_round[k].append(slowest_rank(us, device) if device is not None else us)
    return {k: Timing(us=statistics.median(v), rounds_us=v, mode=modes[k]) for k, v in per_round.items()}


def run_cases(cases: Iterable[Case], row: Callable[[Case, str, Timing], Optional[dict]], *,
              after_case: Optional[Callable[[list], None]] = None, deadline: Optional[float] = None,
              skipped: Optional[list] = None, **timing_kw) -> list:
    """The one benchmark loop: for each case, :func:`time_providers` (``timing_kw``: rounds, device, before, and
    the timer's options, overridden by the case's own ``timing``), then ``row(case, provider, timing)`` per provider
    (None: no row) appended to the result; ``after_case(rows)`` after each case (print progress, save what was
    measured so far). ``deadline`` (``time.time()`` value): cases not started by then are not timed; each goes to
    ``skipped`` as its fields plus ``"providers"`` (the names not timed)."""
    rows = []
    for case in cases:
        if deadline is not None and time.time() > deadline:
            if skipped is not None:
                skipped.append({**case.fields, "providers": list(case.providers)})
        else:
            for name, timing in time_providers(case.providers, **{**timing_kw, **case.timing}).items():
                r = row(case, name, timing)
                if r is not None:
                    rows.append(r)
            if after_case is not None:
                after_case(rows)
        del case  # no reference left: a generator of cases frees this one's inputs before it builds the next
    return rows


# --------------------------------------------------------------------------------------------------------------
# eager baselines (the torch ops a user writes)


def eager_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in fp32: ``x / sqrt(mean(x^2) + eps) * weight`` (fp32 result; the caller rounds
    or quantizes it)."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def eager_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
                      add_fp32: bool = False) -> tuple:
    """``(y, s)``: ``s = x + residual`` (added in fp32 when ``add_fp32``, else in ``x.dtype``), ``y`` =
    :func:`eager_rmsnorm` of ``s`` (fp32), ``s`` returned in ``x.dtype`` (the new residual)."""
    s = x.float() + residual.float() if add_fp32 else x + residual
    return eager_rmsnorm(s, weight, eps), s.to(x.dtype)


def eager_quant(y: torch.Tensor, quant: Optional[str], scale=None, *, out_dtype=torch.bfloat16) -> tuple:
    """fp32 ``y`` -> the tensors of its quantized form, plain torch: ``None`` / ``"bf16"`` -> ``(y in
    out_dtype,)``; ``fp8_static`` (``scale``: the static scale); ``fp8_group128`` (data, per-128-group scales);
    ``nvfp4`` (``scale``: the global scale; data, swizzled block scales)."""
    from tpfuse import quant as q

    if quant in (None, "bf16"):
        return (y.to(out_dtype),)
    if quant == "fp8_static":
        return (q.fp8_quantize_static(y, scale),)
    if quant == "fp8_group128":
        t, h = y.shape
        yg = y.reshape(t, h // 128, 128)
        sc = (yg.abs().amax(dim=-1, keepdim=True) / q.FP8_MAX).clamp(min=q.FP8_MIN_SCALE)
        return (yg * (1.0 / sc)).clamp(-q.FP8_MAX, q.FP8_MAX).to(q.FP8_DTYPE).reshape(t, h), sc.reshape(t, h // 128)
    if quant == "nvfp4":
        return q.nvfp4_quantize(y, scale, "swizzled128x4")
    raise ValueError(quant)


def precompile_pool(worker, tasks, workers: int, timeout_s: float):
    """``worker(task)`` for every task in a spawn process pool, to fill Triton's on-disk cache before a sweep
    times anything; ``worker`` returns an error text or ``None``. Returns ``(seconds, errors)``. A worker that dies
    or a phase past ``timeout_s`` only costs time: the timing loop compiles whatever is still missing."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, TimeoutError as FutTimeout, as_completed

    t0, errs = time.time(), []
    if workers <= 0 or not tasks:
        return 0.0, errs
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
    try:
        futs = [pool.submit(worker, t) for t in tasks]
        for f in as_completed(futs, timeout=timeout_s):
            e = f.exception() or f.result()
            if e:
                errs.append(str(e)[:300])
    except FutTimeout:
        errs.append(f"precompile phase stopped after {timeout_s:.0f} s")
    except Exception as e:  # noqa: BLE001 - e.g. a broken pool: the timing loop compiles what is missing
        errs.append(f"precompile pool failed: {type(e).__name__}: {e}"[:300])
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return time.time() - t0, errs


# --------------------------------------------------------------------------------------------------------------
# plots


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def style_axes(ax, *, title: str, ylabel: str, xlabel: str = "tokens", ylog: bool = True, base: int = 2,
               legend_size=8) -> None:
    """The common look of a "time (or bandwidth) vs tokens" panel: log2 x, optional log y, grid, legend."""
    ax.set_xscale("log", base=base)
    if ylog:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=legend_size)


def plot_ratio_panels(path: str, rows: list, *, panel: tuple, x: str, y: str, baseline: str, ylabel: str,
                      title: str, xlabel=None, refs=(1.0,)) -> Optional[str]:
    """One panel per distinct ``panel`` key (row fields), one line per provider: ``y`` divided by the
    ``baseline`` provider's ``y`` at the same ``x``; dashed lines at ``refs``. ``xlabel``: a string, or a function
    of the panel key. Returns the path, or None without matplotlib."""
    plt = pyplot()
    if plt is None:
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
        xs = sorted({r[x] for r in sel})
        ax.set_xticks(xs, [str(v) for v in xs])  # the measured points, plainly labelled (no 2x10^0 minor labels)
        ax.set_xticks([], minor=True)
        if ax.get_legend_handles_labels()[0]:  # a panel with the baseline alone has nothing to name
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
