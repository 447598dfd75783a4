"""Launch configurations of the local (single-GPU) Triton kernels: add+RMSNorm(+quant), SiLU*mul(+quant) and the
standalone quantizer. The launchers (:mod:`.add_rmsnorm`, :mod:`.silu_mul`, :mod:`.quantize`) ask
:func:`lookup` for a :class:`LaunchConfig`; nothing else decides grid shape or warps.

Lookup key: ``(op, format, hidden bucket, token bucket)``

=============  =================================================================================================
op             ``"add_rmsnorm"``, ``"silu_mul"``, ``"quantize"``
format         ``"none"`` (plain output), ``"fp8_static"``, ``"fp8_per_token"``, ``"fp8_group"`` (any group size),
               ``"nvfp4"`` (linear and swizzled scales) -- :func:`format_name` of the kernels' FMT ids
hidden bucket  ``next_power_of_2`` of the row width the kernel tiles: H for add_rmsnorm / quantize, the
               intermediate size I for silu_mul (14336 -> 16384)
token bucket   the nearest of :data:`TOKEN_BUCKETS` in log2 (ties to the smaller): 1: T <= 4, 16: T <= 45,
               128: T <= 362, 1024: T <= 2896, 8192: T <= 16384, 32768: larger
=============  =================================================================================================

A key missing from :data:`TABLE` gets :func:`default_config` (the rule the launchers used before the table
existed), so an empty table reproduces the old launches exactly.

:class:`LaunchConfig` fields
============  =====================================================================================================
num_warps     warps per program
block         add_rmsnorm: 0 (always the whole row, ``next_power_of_2(H)``); silu_mul / quantize: the tile width
              along the row (power of two >= 128; 0 = the op's default; ignored for per-token FP8, whose scale
              needs the whole row in one tile)
rows          rows per program (a static loop: more bytes in flight per thread, fewer programs; add_rmsnorm
              loads the weight once per program). Must divide 128 (NVFP4 swizzled pads rows to 128)
split         add_rmsnorm only: programs per row (small T). Each one reduces the whole row (the cheap part) and
              normalizes + quantizes its ``BLOCK / split`` slice (the expensive part), so the epilogue of a
              1-token call runs on ``split`` SMs instead of one. No cross-program communication: every program
              computes the same rstd. Ignored for per-token FP8 (the scale needs the whole normalized row)
num_stages    passed to Triton; these kernels have no software-pipelined loop, so it changes nothing today and
              the sweep leaves it at 3
============  =====================================================================================================

Invalid entries for a shape (a slice not a multiple of the quant group, a tile wider than the row, ...) are
repaired by :func:`sanitize`, which every launcher applies.

Updating the table (one file): run ``python bench/bench_local.py --sweep-configs`` on the GPU, then
``python bench/bench_local.py --bake bench/results/local_configs_<dev>.json``, which rewrites only the block
between the ``BEGIN GENERATED TABLE`` / ``END GENERATED TABLE`` markers below with the per-bucket winners
(or edit the entries by hand). The table was measured on one H200 (sm_90); other GPUs use it as is.
Benchmarks can try a sweep's winners without editing this file: :func:`install` / ``--configs``.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, replace
from typing import Dict, Optional, Tuple

from tpfuse.quant import QuantFormat, next_pow2  # absolute: this file is also loaded on its own (the bake check)

OPS = ("add_rmsnorm", "silu_mul", "quantize")
FORMATS = ("none", "fp8_static", "fp8_per_token", "fp8_group", "nvfp4")
TOKEN_BUCKETS = (1, 16, 128, 1024, 8192, 32768)

Key = Tuple[str, str, int, int]


@dataclass(frozen=True)
class LaunchConfig:
    num_warps: int
    block: int = 0
    rows: int = 1
    split: int = 1
    num_stages: int = 3

    def short(self) -> str:
        return f"w{self.num_warps}" + (f"b{self.block}" if self.block else "") + \
            (f"r{self.rows}" if self.rows > 1 else "") + (f"s{self.split}" if self.split > 1 else "")


# BEGIN GENERATED TABLE (python bench/bench_local.py --bake <sweep json>; hand edits welcome)
# source: bench/results/local_configs_h200.json, NVIDIA H200, commit 022ab78, 2026-11-23T02:38:10Z
TABLE: Dict[Key, LaunchConfig] = {
    ('add_rmsnorm', 'none', 4096, 1): LaunchConfig(num_warps=8),
    ('add_rmsnorm', 'none', 4096, 16): LaunchConfig(num_warps=8, split=4),
    ('add_rmsnorm', 'none', 4096, 128): LaunchConfig(num_warps=8),
    ('add_rmsnorm', 'none', 4096, 1024): LaunchConfig(num_warps=4),
    ('add_rmsnorm', 'none', 4096, 8192): LaunchConfig(num_warps=8),
    ('add_rmsnorm', 'none', 4096, 32768): LaunchConfig(num_warps=8),
    ('add_rmsnorm', 'none', 8192, 1): LaunchConfig(num_warps=8, split=8),
    ('add_rmsnorm', 'none', 8192, 16): LaunchConfig(num_warps=8, split=4),
    ('add_rmsnorm', 'none', 8192, 128): LaunchConfig(num_warps=16),
    ('add_rmsnorm', 'none', 8192, 1024): LaunchConfig(num_warps=8),
    ('add_rmsnorm', 'none', 8192, 8192): LaunchConfig(num_warps=16),
    ('add_rmsnorm', 'none', 8192, 32768): LaunchConfig(num_warps=32),
    ('add_rmsnorm', 'fp8_static', 4096, 1): LaunchConfig(num_warps=4, split=8),
    ('add_rmsnorm', 'fp8_static', 4096, 16): LaunchConfig(num_warps=8),
    ('add_rmsnorm', 'fp8_static', 4096, 128): LaunchConfig(num_warps=8),
    ('add_rmsnorm', 'fp8_static', 4096, 1024): LaunchConfig(num_warps=16),
    ('add_rmsnorm', 'fp8_static', 4096, 8192): LaunchConfig(num_warps=16),
    ('add_rmsnorm', 'fp8_static', 4096, 32768): LaunchConfig(num_warps=8),
    ('add_rmsnorm', 'fp8_static', 8192, 1): LaunchConfig(num_warps=8, split=8),
    ('add_rmsnorm', 'fp8_static', 8192, 16): LaunchConfig(num_warps=8, split=4),
    ('add_rmsnorm', 'fp8_static', 8192, 128): LaunchConfig(num_warps=16),
    ('add_rmsnorm', 'fp8_static', 8192, 1024): LaunchConfig(num_warps=8),
    ('add_rmsnorm', 'fp8_static', 8192, 8192): LaunchConfig(num_warps=16),
    ('add_rmsnorm', 'fp8_static', 8192, 32768): LaunchConfig(num_warps=16),
    ('add_rmsnorm', 'fp8_group', 4096, 1): LaunchConfig(num_warps=4, split=8),
    ('add_rmsnorm', 'fp8_group', 4096, 16): LaunchConfig(num_warps=8, split=4),
    ('add_rmsnorm', 'fp8_group', 4096, 128): LaunchConfig(num_warps=8),
    ('add_rmsnorm', 'fp8_group', 4096, 1024): LaunchConfig(num_warps=8),
    ('add_rmsnorm', 'fp8_group', 4096, 8192): LaunchConfig(num_warps=16),
    ('add_rmsnorm', 'fp8_group', 4096, 32768): LaunchConfig(num_warps=16),
    ('add_rmsnorm', 'fp8_group', 8192, 1): LaunchConfig(num_warps=8, split=8),
    ('add_rmsnorm', 'fp8_group', 8192, 16): LaunchConfig(num_warps=8, split=8),
    ('add_rmsnorm', 'fp8_group', 8192, 128): LaunchConfig(num_warps=16),
    ('add_rmsnorm', 'fp8_group', 8192, 1024): LaunchConfig(num_warps=16),
    ('add_rmsnorm', 'fp8_group', 8192, 8192): LaunchConfig(num_warps=16),
    ('add_rmsnorm', 'fp8_group', 8192, 32768): LaunchConfig(num_warps=16),
    ('add_rmsnorm', 'nvfp4', 4096, 1): LaunchConfig(num_warps=4, split=8),
    ('add_rmsnorm', 'nvfp4', 4096, 16): LaunchConfig(num_warps=8, split=4),
    ('add_rmsnorm', 'nvfp4', 4096, 128): LaunchConfig(num_warps=8),
    ('add_rmsnorm', 'nvfp4', 4096, 1024): LaunchConfig(num_warps=8),
    ('add_rmsnorm', 'nvfp4', 4096, 8192): LaunchConfig(num_warps=8),
    ('add_rmsnorm', 'nvfp4', 4096, 32768): LaunchConfig(num_warps=8),
    ('add_rmsnorm', 'nvfp4', 8192, 1): LaunchConfig(num_warps=8, split=8),
    ('add_rmsnorm', 'nvfp4', 8192, 16): LaunchConfig(num_warps=8, split=4),
    ('add_rmsnorm', 'nvfp4', 8192, 128): LaunchConfig(num_warps=16),
    ('add_rmsnorm', 'nvfp4', 8192, 1024): LaunchConfig(num_warps=16),
    ('add_rmsnorm', 'nvfp4', 8192, 8192): LaunchConfig(num_warps=8),
    ('add_rmsnorm', 'nvfp4', 8192, 32768): LaunchConfig(num_warps=8),
    ('silu_mul', 'none', 16384, 1): LaunchConfig(num_warps=2, block=256),
    ('silu_mul', 'none', 16384, 16): LaunchConfig(num_warps=8, block=1024),
    ('silu_mul', 'none', 16384, 128): LaunchConfig(num_warps=8, block=4096),
    ('silu_mul', 'none', 16384, 1024): LaunchConfig(num_warps=8, block=2048),
    ('silu_mul', 'none', 16384, 8192): LaunchConfig(num_warps=8, block=2048),
    ('silu_mul', 'none', 16384, 32768): LaunchConfig(num_warps=8, block=2048),
    ('silu_mul', 'fp8_static', 16384, 1): LaunchConfig(num_warps=4, block=512),
    ('silu_mul', 'fp8_static', 16384, 16): LaunchConfig(num_warps=8, block=2048),
    ('silu_mul', 'fp8_static', 16384, 128): LaunchConfig(num_warps=4, block=1024),
    ('silu_mul', 'fp8_static', 16384, 1024): LaunchConfig(num_warps=4, block=1024, rows=2),
    ('silu_mul', 'fp8_static', 16384, 8192): LaunchConfig(num_warps=4, block=1024, rows=2),
    ('silu_mul', 'fp8_static', 16384, 32768): LaunchConfig(num_warps=4, block=2048),
    ('silu_mul', 'fp8_group', 16384, 1): LaunchConfig(num_warps=4, block=512),
    ('silu_mul', 'fp8_group', 16384, 16): LaunchConfig(num_warps=8, block=2048),
    ('silu_mul', 'fp8_group', 16384, 128): LaunchConfig(num_warps=4, block=1024),
    ('silu_mul', 'fp8_group', 16384, 1024): LaunchConfig(num_warps=4, block=2048),
    ('silu_mul', 'fp8_group', 16384, 8192): LaunchConfig(num_warps=4, block=2048),
    ('silu_mul', 'fp8_group', 16384, 32768): LaunchConfig(num_warps=4, block=2048),
    ('silu_mul', 'nvfp4', 16384, 1): LaunchConfig(num_warps=4, block=512),
    ('silu_mul', 'nvfp4', 16384, 16): LaunchConfig(num_warps=4, block=1024),
    ('silu_mul', 'nvfp4', 16384, 128): LaunchConfig(num_warps=2, block=1024),
    ('silu_mul', 'nvfp4', 16384, 1024): LaunchConfig(num_warps=4, block=2048),
    ('silu_mul', 'nvfp4', 16384, 8192): LaunchConfig(num_warps=4, block=2048),
    ('silu_mul', 'nvfp4', 16384, 32768): LaunchConfig(num_warps=4, block=2048),
    ('quantize', 'fp8_per_token', 4096, 1): LaunchConfig(num_warps=8, block=4096),
    ('quantize', 'fp8_per_token', 4096, 16): LaunchConfig(num_warps=8, block=4096),
    ('quantize', 'fp8_per_token', 4096, 128): LaunchConfig(num_warps=8, block=4096),
    ('quantize', 'fp8_per_token', 4096, 1024): LaunchConfig(num_warps=4, block=4096),
    ('quantize', 'fp8_per_token', 4096, 8192): LaunchConfig(num_warps=4, block=4096),
    ('quantize', 'fp8_per_token', 4096, 32768): LaunchConfig(num_warps=4, block=4096),
    ('quantize', 'fp8_per_token', 8192, 1): LaunchConfig(num_warps=8, block=8192),
    ('quantize', 'fp8_per_token', 8192, 16): LaunchConfig(num_warps=8, block=8192),
    ('quantize', 'fp8_per_token', 8192, 128): LaunchConfig(num_warps=8, block=8192),
    ('quantize', 'fp8_per_token', 8192, 1024): LaunchConfig(num_warps=8, block=8192, rows=2),
    ('quantize', 'fp8_per_token', 8192, 8192): LaunchConfig(num_warps=8, block=8192),
    ('quantize', 'fp8_per_token', 8192, 32768): LaunchConfig(num_warps=8, block=8192),
    ('quantize', 'fp8_group', 4096, 1): LaunchConfig(num_warps=4, block=1024),
    ('quantize', 'fp8_group', 4096, 16): LaunchConfig(num_warps=4, block=1024),
    ('quantize', 'fp8_group', 4096, 128): LaunchConfig(num_warps=16, block=4096),
    ('quantize', 'fp8_group', 4096, 1024): LaunchConfig(num_warps=4, block=1024, rows=2),
    ('quantize', 'fp8_group', 4096, 8192): LaunchConfig(num_warps=8, block=4096, rows=2),
    ('quantize', 'fp8_group', 4096, 32768): LaunchConfig(num_warps=8, block=4096, rows=2),
    ('quantize', 'fp8_group', 8192, 1): LaunchConfig(num_warps=4, block=1024),
    ('quantize', 'fp8_group', 8192, 16): LaunchConfig(num_warps=8, block=2048),
    ('quantize', 'fp8_group', 8192, 128): LaunchConfig(num_warps=8, block=4096),
    ('quantize', 'fp8_group', 8192, 1024): LaunchConfig(num_warps=16, block=8192),
    ('quantize', 'fp8_group', 8192, 8192): LaunchConfig(num_warps=8, block=4096, rows=2),
    ('quantize', 'fp8_group', 8192, 32768): LaunchConfig(num_warps=8, block=4096, rows=4),
    ('quantize', 'nvfp4', 4096, 1): LaunchConfig(num_warps=4, block=512),
    ('quantize', 'nvfp4', 4096, 16): LaunchConfig(num_warps=4, block=1024),
    ('quantize', 'nvfp4', 4096, 128): LaunchConfig(num_warps=4, block=1024),
    ('quantize', 'nvfp4', 4096, 1024): LaunchConfig(num_warps=4, block=2048),
    ('quantize', 'nvfp4', 4096, 8192): LaunchConfig(num_warps=8, block=4096, rows=2),
    ('quantize', 'nvfp4', 4096, 32768): LaunchConfig(num_warps=8, block=4096, rows=4),
    ('quantize', 'nvfp4', 8192, 1): LaunchConfig(num_warps=4, block=512),
    ('quantize', 'nvfp4', 8192, 16): LaunchConfig(num_warps=4, block=1024),
    ('quantize', 'nvfp4', 8192, 128): LaunchConfig(num_warps=4, block=2048),
    ('quantize', 'nvfp4', 8192, 1024): LaunchConfig(num_warps=8, block=4096, rows=2),
    ('quantize', 'nvfp4', 8192, 8192): LaunchConfig(num_warps=8, block=4096, rows=4),
    ('quantize', 'nvfp4', 8192, 32768): LaunchConfig(num_warps=8, block=4096, rows=4),
}
# END GENERATED TABLE

_OVERRIDE: Dict[Key, LaunchConfig] = {}
_FORCED: Optional[LaunchConfig] = None


# the table's format names: FP8 groups of any size share one name, and both NVFP4 scale layouts
FORMAT_NAMES: Dict[QuantFormat, str] = {
    QuantFormat.NONE: "none", QuantFormat.FP8_STATIC: "fp8_static", QuantFormat.FP8_PER_TOKEN: "fp8_per_token",
    QuantFormat.FP8_PER_GROUP: "fp8_group", QuantFormat.NVFP4_LINEAR: "nvfp4", QuantFormat.NVFP4_SWIZZLED: "nvfp4"}


def format_name(fmt: int) -> str:
    """Table name of a :class:`~tpfuse.quant.QuantFormat`."""
    return FORMAT_NAMES[fmt]


def token_bucket(tokens: int) -> int:
    t = math.log2(max(int(tokens), 1))
    return min(TOKEN_BUCKETS, key=lambda b: (abs(t - math.log2(b)), b))


def default_config(op: str, fmt: int, width: int, tokens: int) -> LaunchConfig:
    """The launch rule used before the table (kept as the fallback): whole-row add_rmsnorm with
    ``max(4, min(16, BLOCK // 512))`` warps; silu_mul tiles of ``min(next_pow2(I), 2048)`` with
    ``max(4, min(16, tile // 256))`` warps; quantize tiles of ``min(next_pow2(H), 4096)`` with
    ``max(4, min(16, tile // 512))`` warps; one row per program, no split."""
    full = next_pow2(width)
    if op == "add_rmsnorm":
        return LaunchConfig(num_warps=max(4, min(16, full // 512)))
    if op == "silu_mul":
        block = full if fmt == QuantFormat.FP8_PER_TOKEN else max(128, min(full, 2048))
        return LaunchConfig(num_warps=max(4, min(16, block // 256)), block=block)
    if op == "quantize":
        block = full if fmt == QuantFormat.FP8_PER_TOKEN else max(128, min(full, 4096))
        return LaunchConfig(num_warps=max(4, min(16, block // 512)), block=block)
    raise ValueError(f"unknown op {op!r}")


def sanitize(op: str, fmt: int, width: int, group_size: int, cfg: LaunchConfig) -> LaunchConfig:
    """``cfg`` made valid for this shape (see the module table); unchanged when already valid. ``group_size``: the
    FP8 group size (format FP8_PER_GROUP)."""
    full = next_pow2(width)
    per_token = fmt == QuantFormat.FP8_PER_TOKEN  # its scale needs the whole row in one program
    unit = group_size if fmt == QuantFormat.FP8_PER_GROUP else (16 if fmt >= QuantFormat.NVFP4_LINEAR else 1)
    rows = cfg.rows if cfg.rows in (1, 2, 4, 8, 16, 32, 64, 128) else 1
    nw = cfg.num_warps if cfg.num_warps in (1, 2, 4, 8, 16, 32) else default_config(op, fmt, width, 1).num_warps
    if op == "add_rmsnorm":
        split = cfg.split if cfg.split in (1, 2, 4, 8, 16) else 1
        while split > 1 and (per_token or full // split < max(unit, 128) or (full // split) % max(unit, 1)):
            split //= 2
        return replace(cfg, num_warps=nw, block=0, rows=rows, split=split)
    block = cfg.block or default_config(op, fmt, width, 1).block
    if per_token:
        block = full
    block = max(128, min(next_pow2(block), full), unit if unit > 1 else 128)
    return replace(cfg, num_warps=nw, block=block, rows=rows, split=1)


def lookup_uncached(op: str, fmt: int, width: int, tokens: int, group_size: int = 128) -> LaunchConfig:
    """:func:`lookup` without its memo (what the memo stores)."""
    if _FORCED is not None:
        cfg = _FORCED
    else:
        key = (op, format_name(fmt), next_pow2(width), token_bucket(tokens))
        cfg = _OVERRIDE.get(key) or TABLE.get(key) or default_config(op, fmt, width, tokens)
    return sanitize(op, fmt, width, group_size, cfg)


# lookup() runs on every eager launch (the decode hot path): its result depends only on its arguments and on
# TABLE / _OVERRIDE / _FORCED, so it is memoized per argument tuple. The memo belongs to one TABLE object (a test
# or tool that rebinds TABLE gets a fresh memo) and is dropped by install() and forced(); code that edits TABLE
# in place must call clear_cache().
_MEMO: Dict[tuple, LaunchConfig] = {}
_MEMO_TABLE: list = [None]
_MEMO_MAX = 1 << 14


def clear_cache() -> None:
    """Forget the memoized lookups (after editing :data:`TABLE` in place)."""
    _MEMO.clear()
    _MEMO_TABLE[0] = TABLE


def lookup(op: str, fmt: int, width: int, tokens: int, group_size: int = 128) -> LaunchConfig:
    """The configuration a launcher uses for ``tokens`` rows of width ``width`` (H, or I for silu_mul)."""
    if _MEMO_TABLE[0] is not TABLE or _FORCED is not None:
        if _FORCED is not None:
            return lookup_uncached(op, fmt, width, tokens, group_size)
        clear_cache()
    key = (op, fmt, width, tokens, group_size)
    cfg = _MEMO.get(key)
    if cfg is None:
        if len(_MEMO) >= _MEMO_MAX:
            _MEMO.clear()
        cfg = _MEMO[key] = lookup_uncached(op, fmt, width, tokens, group_size)
    return cfg


# --------------------------------------------------------------------------------------------------------------
# benchmark hooks (not used by tpfuse itself)


@contextlib.contextmanager
def forced(cfg: Optional[LaunchConfig]):
    """Every lookup returns ``cfg`` (sanitized) while active: the config sweep times candidates through the
    public ops with it."""
    global _FORCED
    old, _FORCED = _FORCED, cfg
    try:
        yield
    finally:
        _FORCED = old
        clear_cache()


def config_from_dict(d: dict) -> LaunchConfig:
    return LaunchConfig(**{k: int(v) for k, v in d.items() if k in LaunchConfig.__dataclass_fields__})


def winners(sweep: dict) -> Dict[Key, LaunchConfig]:
    """The ``best`` entries of a sweep JSON (bench/bench_local.py ``--sweep-configs``) as table entries."""
    out = {}
    for b in sweep["best"]:
        out[(b["op"], b["format"], int(b["hidden_bucket"]), int(b["token_bucket"]))] = config_from_dict(b["config"])
    return out


def install(path_or_dict) -> int:
    """Overlay a sweep's winners on the table for this process (``--configs``); returns the entry count."""
    sweep = path_or_dict if isinstance(path_or_dict, dict) else json.load(open(path_or_dict))
    w = winners(sweep)
    _OVERRIDE.clear()
    _OVERRIDE.update(w)
    clear_cache()
    return len(w)


def render_table(entries: Dict[Key, LaunchConfig], source: str = "") -> str:
    """Python source of the generated block (markers included) for ``entries``; fields equal to the
    dataclass defaults are left out. ``source``: one line naming the sweep (file, device, commit, date)."""
    lines = ["# BEGIN GENERATED TABLE (python bench/bench_local.py --bake <sweep json>; hand edits welcome)"]
    if source:
        lines.append(f"# source: {source}")
    lines.append("TABLE: Dict[Key, LaunchConfig] = {")
    defaults = LaunchConfig(num_warps=0)
    for key in sorted(entries, key=lambda k: (OPS.index(k[0]), FORMATS.index(k[1]), k[2], k[3])):
        cfg = entries[key]
        fields = ", ".join(f"{k}={v}" for k, v in asdict(cfg).items()
                           if k == "num_warps" or v != getattr(defaults, k))
        lines.append(f"    {key!r}: LaunchConfig({fields}),")
    lines += ["}", "# END GENERATED TABLE"]
    return "\n".join(lines) + "\n"


def bake(source: str, entries: Dict[Key, LaunchConfig], origin: str = "") -> str:
    """``source`` (this file's text) with the generated block replaced by ``entries`` (``origin``: the sweep's
    file, device, commit and date, written above the table)."""
    begin = source.index("# BEGIN GENERATED TABLE")
    end = source.index("# END GENERATED TABLE")
    end = source.index("\n", end) + 1
    return source[:begin] + render_table(entries, origin) + source[end:]
