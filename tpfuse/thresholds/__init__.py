"""Thresholds tables: which path each op takes, by activation bytes, per GPU arch, TP size and dtype.

The shipped table is ``default.json`` beside this file; ``bench/tune.py`` writes tables of the same schema, and
``CommConfig.thresholds_path`` or ``$TPFUSE_THRESHOLDS`` point a communicator at one.

Schema (``"schema": 1``)::

    {"rows": [{"arch": "sm90" | "cpu" | "*", "tp": 2 | "*", "dtype": "bfloat16" | "*",
               "hidden": 8192,                           # optional: a row for one hidden size only
               "source": {...where the numbers come from: file, device, commit, date...},
               "sp_min_bytes": int,                      # AR -> sequence-parallel switch
               "paths": {op: [{"max_bytes": int | null, "path": name}, ...]}}]}   # ascending, last is null

"activation bytes" = ``num_tokens * hidden * itemsize`` of one rank's full ``[T, H]`` input. A bucket applies when
``bytes <= max_bytes``; the last bucket (``null``) takes everything above.

Lookup order: ``(arch, tp, dtype, hidden)``, ``(arch, tp, dtype)``, ``(arch, tp, *)``, ``(arch, *, *)``,
``(*, *, *)`` - rows without ``"hidden"`` serve every hidden size.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

OPS = ("all_reduce", "fused_add_rmsnorm", "reduce_scatter_rmsnorm", "all_gather", "all_gather_matmul",
       "matmul_reduce_scatter")
DEFAULT_TABLE = os.path.join(os.path.dirname(__file__), "default.json")


class ThresholdsError(ValueError):
    """A thresholds table is malformed."""


@dataclass(frozen=True)
class Row:
    arch: str
    tp: object
    dtype: str
    sp_min_bytes: int
    paths: Dict[str, List[Tuple[Optional[int], str]]]
    source: dict
    index: int
    hidden: Optional[int] = None

    def key(self) -> str:
        return f"{self.arch}/tp{self.tp}/{self.dtype}" + (f"/h{self.hidden}" if self.hidden else "")

    def pick(self, op: str, nbytes: int) -> Tuple[str, Optional[int], Optional[int]]:
        """(path, lower bound exclusive, upper bound inclusive) of the bucket holding ``nbytes``."""
        lo = None
        for max_bytes, path in self.paths[op]:
            if max_bytes is None or nbytes <= max_bytes:
                return path, lo, max_bytes
            lo = max_bytes
        raise AssertionError("validated tables end with a null bucket")


@dataclass(frozen=True)
class Table:
    path: str
    rows: Tuple[Row, ...]

    def lookup(self, arch: str, tp: int, dtype: str, hidden: Optional[int] = None) -> Row:
        if hidden is not None:
            for row in self.rows:
                if (row.arch, row.tp, row.dtype, row.hidden) == (arch, tp, dtype, hidden):
                    return row
        for want in ((arch, tp, dtype), (arch, tp, "*"), (arch, "*", "*"), ("*", "*", "*")):
            for row in self.rows:
                if (row.arch, row.tp, row.dtype) == want and row.hidden is None:
                    return row
        raise ThresholdsError(f"{self.path}: no row for arch={arch} tp={tp} dtype={dtype} and no '*' row")


def _parse_row(i: int, raw: dict, where: str) -> Row:
    try:
        arch, tp, dtype = str(raw["arch"]), raw["tp"], str(raw["dtype"])
        sp_min = int(raw["sp_min_bytes"])
        paths_raw = raw["paths"]
    except (KeyError, TypeError, ValueError) as e:
        raise ThresholdsError(f"{where}: row {i} lacks arch/tp/dtype/sp_min_bytes/paths ({e})") from None
    if tp != "*" and not (isinstance(tp, int) and tp >= 1):
        raise ThresholdsError(f"{where}: row {i} tp must be a positive int or '*', got {tp!r}")
    hidden = raw.get("hidden")
    if hidden is not None and not (isinstance(hidden, int) and hidden >= 1):
        raise ThresholdsError(f"{where}: row {i} hidden must be a positive int, got {hidden!r}")
    paths = {}
    for op in OPS:
        buckets = paths_raw.get(op)
        if not buckets:
            raise ThresholdsError(f"{where}: row {i} ({arch}/tp{tp}) has no buckets for op {op!r}")
        parsed, last = [], -1
        for b in buckets:
            mb, name = b.get("max_bytes"), b.get("path")
            if not isinstance(name, str):
                raise ThresholdsError(f"{where}: row {i} op {op}: bucket without a path name: {b}")
            if mb is not None and (not isinstance(mb, int) or mb <= last):
                raise ThresholdsError(f"{where}: row {i} op {op}: max_bytes must be ascending ints, got {mb!r}")
            parsed.append((mb, name))
            last = mb if mb is not None else last
        if parsed[-1][0] is not None:
            raise ThresholdsError(f"{where}: row {i} op {op}: the last bucket must have max_bytes null")
        paths[op] = parsed
    unknown = set(paths_raw) - set(OPS)
    if unknown:
        raise ThresholdsError(f"{where}: row {i} names unknown ops {sorted(unknown)}")
    return Row(arch=arch, tp=tp, dtype=dtype, sp_min_bytes=sp_min, paths=paths, source=raw.get("source", {}),
               index=i, hidden=hidden)


_cache: Dict[Tuple[str, float], Table] = {}


def load(path: Optional[str] = None) -> Table:
    """Load and validate a table (``None``: the shipped one). Cached by path and modification time."""
    path = os.path.abspath(path or DEFAULT_TABLE)
    try:
        key = (path, os.path.getmtime(path))
    except OSError:
        raise ThresholdsError(f"thresholds table not found: {path}") from None
    if key not in _cache:
        try:
            with open(path) as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ThresholdsError(f"{path}: not valid JSON ({e})") from None
        if raw.get("schema") != 1 or not isinstance(raw.get("rows"), list):
            raise ThresholdsError(f"{path}: expected {{'schema': 1, 'rows': [...]}}")
        _cache[key] = Table(path=path, rows=tuple(_parse_row(i, r, path) for i, r in enumerate(raw["rows"])))
    return _cache[key]
