"""Configuration of a :class:`tpfuse.TPCommunicator`.

Environment variables are escape hatches only, each documented here:

``TPFUSE_THRESHOLDS``
    Path of a thresholds JSON table (the format of ``tpfuse/thresholds/default.json``, written by
    ``bench/tune.py``). Used when ``CommConfig.thresholds_path`` is not set. Precedence:
    ``CommConfig.thresholds_path`` > ``TPFUSE_THRESHOLDS`` > the table shipped in the package.
"""

from __future__ import annotations

import os
import warnings
from collections import abc
from dataclasses import dataclass, field
from typing import Mapping, Optional

THRESHOLDS_ENV = "TPFUSE_THRESHOLDS"


@dataclass(kw_only=True)
class CommConfig:
    """Knobs of one TP communicator. Every rank of a group must pass an equal config."""

    thresholds_path: Optional[str] = None
    """Thresholds table to load instead of the shipped one (see module docstring for precedence)."""

    allowed_paths: Optional[frozenset] = None
    """If set, only these path names may run (e.g. ``{"reference", "tpfuse_twoshot"}``); others fall back to
    ``"reference"``, which is always allowed. ``None`` allows every path whose backend is present."""

    force_paths: Mapping[str, str] = field(default_factory=dict)
    """Op name -> path name that overrides the table (benchmarks, tests, debugging). Unknown op or path names are
    rejected here (:class:`~tpfuse.errors.TPFuseInputError`). The forced path must be available here, else that op
    raises ``TPFuseInputError`` when called (the other ops still run; a forced path never falls back to another
    path because it is unavailable). One documented exception per call: a path may decline one call it cannot run
    (a FlashInfer path, for an output form FlashInfer cannot produce: NVFP4, dynamic FP8, Gemma, ...); the call
    then runs on the path's fallbacks (tpfuse's kernel of the same shot count first), reported in
    ``TPCommunicator.last_path`` and ``last_fallback``."""

    arch: Optional[str] = None
    """Plan as if on this arch (``"sm90"``, ``"sm100"``, ``"cpu"``). ``None`` detects it from the group's device.
    Used to inspect GPU decisions from a CPU machine; execution still uses what is available here."""

    sp_min_tokens: Optional[int] = None
    """Override of the table's AR -> sequence-parallel switch point, in tokens (``plan().mode``): sequence-parallel
    from this many tokens on (an int >= 1; 1 = always)."""

    debug: bool = False
    """Cross-rank checks before every call and at ``close()``: all ranks exchange (op, shapes, dtypes, call
    counter, local validation result) and all raise :class:`~tpfuse.errors.TPFuseMismatchError` if they differ.
    Costs one small collective (and a host sync) per call: for debugging only. The exchange is bounded by
    ``timeout_s`` like every other wait."""

    all_workspaces: bool = False
    """Allocate every backend's workspace that can run here, whether or not the table routes any size to it (by
    default a backend allocates only when the table or ``force_paths`` can choose it), restricted to the paths in
    ``allowed_paths`` when that is set. The tuner and the benchmarks set it to time every path with one
    communicator; costs device memory (and FlashInfer's JIT build, ~2 min on a fresh machine, unless
    ``allowed_paths`` leaves FlashInfer's paths out)."""

    timeout_s: float = 30.0
    """Upper bound on any wait for a peer, in seconds (> 0): in tpfuse's own kernels and semaphores, and in the
    communicator's collectives, which run on a process group of the same ranks created with this timeout (gloo:
    the wait raises; NCCL: the ProcessGroupNCCL watchdog aborts the collective, see the README's contract). A peer
    that does not arrive makes the waiting ranks raise :class:`~tpfuse.errors.TPFusePeerTimeout`; the
    communicator is broken from then on."""

    pipe_producers: Optional[int] = None
    """Programs of the pipelined one-shot all-reduce (``tpfuse_oneshot_pipe``) that push (the others reduce), an
    int >= 1 (capped at the grid size - 1). ``None``: a quarter of the grid, the fastest for bf16 output on the
    H200 pair (``bench/results/fused_ar_tp2_h200_pipe.json``). A tuning knob: ``bench/bench_fused_ar.py`` sweeps it."""

    def __post_init__(self) -> None:
        # reject what would otherwise plan silently wrong (a negative switch point = SP at every size) or fail far
        # from the cause (a zero timeout = every peer wait times out); rank-local, raised before any collective
        from .errors import TPFuseInputError

        s = self.sp_min_tokens
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 1):
            raise TPFuseInputError(f"CommConfig.sp_min_tokens must be None or an int >= 1 (tokens), got {s!r}")
        p = self.pipe_producers
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p < 1):
            raise TPFuseInputError(f"CommConfig.pipe_producers must be None or an int >= 1 (programs), got {p!r}")
        t = self.timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise TPFuseInputError(f"CommConfig.timeout_s must be a number > 0 (seconds), got {t!r}")
        if not isinstance(self.debug, bool):
            raise TPFuseInputError(f"CommConfig.debug must be True or False, got {self.debug!r}")
        # op and path names are checked here, not at the first call: a misspelled name would otherwise be ignored
        from .dispatch import PATH_DOCS
        from .thresholds import OPS

        if not isinstance(self.force_paths, abc.Mapping):
            raise TPFuseInputError(f"CommConfig.force_paths maps op names to path names (a dict), got "
                                   f"{type(self.force_paths).__name__}")
        bad = {k: v for k, v in dict(self.force_paths).items() if not (isinstance(k, str) and isinstance(v, str))}
        if bad:
            raise TPFuseInputError(f"CommConfig.force_paths maps op names to path names (str -> str), got {bad!r}")
        self.force_paths = _current_paths(self.force_paths)
        for op, path in dict(self.force_paths).items():
            if op not in OPS:
                raise TPFuseInputError(f"CommConfig.force_paths: unknown op {op!r}; ops: {', '.join(OPS)}")
            if path not in PATH_DOCS:
                raise TPFuseInputError(f"CommConfig.force_paths[{op!r}]: unknown path {path!r}; paths: "
                                       f"{', '.join(sorted(PATH_DOCS))}")
        if self.allowed_paths is not None:
            if isinstance(self.allowed_paths, str) or not all(isinstance(p, str) for p in self.allowed_paths):
                raise TPFuseInputError("CommConfig.allowed_paths must be a set of path names, got "
                                       f"{self.allowed_paths!r}")
            self.allowed_paths = set(_current_paths(dict.fromkeys(self.allowed_paths, "")))
            unknown = sorted(set(self.allowed_paths) - set(PATH_DOCS))
            if unknown:
                raise TPFuseInputError(f"CommConfig.allowed_paths: unknown path(s) {unknown}; paths: "
                                       f"{', '.join(sorted(PATH_DOCS))}")
            self.allowed_paths = frozenset(self.allowed_paths)
        tp = self.thresholds_path
        if tp is not None and not (isinstance(tp, (str, os.PathLike)) and str(tp)):
            raise TPFuseInputError(f"CommConfig.thresholds_path must be a file path (str), got {tp!r}")

    def resolved_thresholds_path(self) -> Optional[str]:
        """The table path in effect: the config's, else ``$TPFUSE_THRESHOLDS``, else ``None`` (shipped table)."""
        return self.thresholds_path or os.environ.get(THRESHOLDS_ENV) or None


def _current_paths(op_paths) -> dict:
    """``op_paths`` (a mapping whose keys or values may be path names) with renamed paths under their current
    names, warning once per former name used."""
    from .dispatch import RENAMED_PATHS

    out = {}
    for k, v in dict(op_paths).items():  # a loop, not a comprehension: the warning's stacklevel counts frames
        for name in (k, v):
            if isinstance(name, str) and name in RENAMED_PATHS:
                # this function, __post_init__, the dataclass __init__, then the caller's line
                warnings.warn(f"CommConfig: path {name!r} was renamed {RENAMED_PATHS[name]!r}", DeprecationWarning,
                              stacklevel=4)
        out[RENAMED_PATHS.get(k, k)] = RENAMED_PATHS.get(v, v)
    return out
