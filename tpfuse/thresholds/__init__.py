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

from ..errors import ThresholdsError  # noqa: F401  (re-exported: tpfuse.thresholds.ThresholdsError)

OPS = ("all_reduce", "fused_add_rmsnorm", "reduce_scatter_rmsnorm", "all_gather", "all_gather_matmul",
       "matmul_reduce_scatter")
DEFAULT_TABLE = os.path.join(os.path.dirname(__file__), "default.json")


def current_path(name: str) -> str:
    from ..dispatch import current_path as current  # lazy: dispatch imports this module

    return current(name)


def _known_paths() -> frozenset:
    from ..dispatch import PATH_DOCS  # lazy: dispatch imports this module

    return frozenset(PATH_DOCS)


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


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_row(i: int, raw, where: str) -> Row:
    """One validated row; every rejection names the file, the row index and the field."""
    at = f"{where}: row {i}"
    if not isinstance(raw, dict):
        raise ThresholdsError(f"{at} must be an object, got {type(raw).__name__}: {raw!r:.80}")
    missing = [k for k in ("arch", "tp", "dtype", "sp_min_bytes", "paths") if k not in raw]
    if missing:
        raise ThresholdsError(f"{at} lacks {missing} (every row needs arch, tp, dtype, sp_min_bytes, paths)")
    arch, tp, dtype, sp_min, paths_raw = raw["arch"], raw["tp"], raw["dtype"], raw["sp_min_bytes"], raw["paths"]
    for field, v in (("arch", arch), ("dtype", dtype)):
        if not isinstance(v, str) or not v:
            raise ThresholdsError(f"{at}: '{field}' must be a non-empty string ('*' for any), got {v!r}")
    if tp != "*" and not (_int(tp) and tp >= 1):
        raise ThresholdsError(f"{at}: 'tp' must be a positive int or '*', got {tp!r}")
    if not (_int(sp_min) and sp_min >= 0):
        raise ThresholdsError(f"{at}: 'sp_min_bytes' must be an int >= 0 (bytes), got {sp_min!r}")
    hidden = raw.get("hidden")
    if hidden is not None and not (_int(hidden) and hidden >= 1):
        raise ThresholdsError(f"{at}: 'hidden' must be a positive int, got {hidden!r}")
    source = raw.get("source", {})
    if not isinstance(source, dict):
        raise ThresholdsError(f"{at}: 'source' must be an object, got {type(source).__name__}")
    if not isinstance(paths_raw, dict):
        raise ThresholdsError(f"{at}: 'paths' must be an object {{op: [buckets]}}, got {type(paths_raw).__name__}: "
                              f"{paths_raw!r:.80}")
    unknown = set(paths_raw) - set(OPS)
    if unknown:
        raise ThresholdsError(f"{at} names unknown ops {sorted(unknown)} in 'paths' (known: {', '.join(OPS)})")
    known_paths = _known_paths()
    paths = {}
    for op in OPS:
        buckets = paths_raw.get(op)
        if not buckets:
            raise ThresholdsError(f"{at} ({arch}/tp{tp}) has no buckets for op {op!r}")
        if not isinstance(buckets, list):
            raise ThresholdsError(f"{at} op {op}: buckets must be a list, got {type(buckets).__name__}")
        parsed, last = [], -1
        for j, b in enumerate(buckets):
            bat = f"{at} op {op} bucket {j}"
            if not isinstance(b, dict):
                raise ThresholdsError(f"{bat} must be an object {{\"max_bytes\": int | null, \"path\": name}}, got "
                                      f"{b!r:.80}")
            mb, name = b.get("max_bytes"), b.get("path")
            if not isinstance(name, str):
                raise ThresholdsError(f"{bat}: 'path' must be a path name, got {name!r}")
            name = current_path(name)  # tables written before a path was renamed
            if name not in known_paths:
                raise ThresholdsError(f"{bat}: unknown path {name!r} (known: {', '.join(sorted(known_paths))})")
            if mb is not None and (not _int(mb) or mb <= last):
                raise ThresholdsError(f"{bat}: 'max_bytes' must be ascending ints, got {mb!r}")
            parsed.append((mb, name))
            last = mb if mb is not None else last
        if parsed[-1][0] is not None:
            raise ThresholdsError(f"{at} op {op}: the last bucket must have max_bytes null")
        if any(mb is None for mb, _ in parsed[:-1]):
            raise ThresholdsError(f"{at} op {op}: only the last bucket may have max_bytes null")
        paths[op] = parsed
    return Row(arch=arch, tp=tp, dtype=dtype, sp_min_bytes=sp_min, paths=paths, source=source, index=i,
               hidden=hidden)


_cache: Dict[Tuple[str, float], Table] = {}


def load(path: Optional[str] = None) -> Table:
    """Load and validate a table (``None``: the shipped one). Cached by path and modification time. Raises
    :class:`ThresholdsError` (a :class:`~tpfuse.errors.TPFuseInputError`) naming the file, and the row and field,
    for anything unreadable or malformed."""
    path = os.path.abspath(path or DEFAULT_TABLE)
    try:
        key = (path, os.path.getmtime(path))
    except OSError:
        raise ThresholdsError(f"thresholds table not found: {path}") from None
    if key not in _cache:
        if os.path.isdir(path):
            raise ThresholdsError(f"{path}: is a directory, not a thresholds table (a JSON file)")
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except UnicodeDecodeError as e:
            raise ThresholdsError(f"{path}: not a text (UTF-8 JSON) file ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise ThresholdsError(f"{path}: not valid JSON ({e})") from None
        except OSError as e:
            raise ThresholdsError(f"{path}: cannot read the thresholds table ({e.strerror or e})") from None
        if not isinstance(raw, dict) or raw.get("schema") != 1 or not isinstance(raw.get("rows"), list):
            got = type(raw).__name__ if not isinstance(raw, dict) else f"schema={raw.get('schema')!r}"
            raise ThresholdsError(f"{path}: expected {{'schema': 1, 'rows': [...]}}, got {got}")
        _cache[key] = Table(path=path, rows=tuple(_parse_row(i, r, path) for i, r in enumerate(raw["rows"])))
    return _cache[key]
