"""Launch configurations and the routing table of the small-M GEMM (:mod:`tpfuse.kernels.small_m_gemm`). No Triton
here: the model path asks :func:`route` on every decode-sized GEMM, also where Triton is absent.

Key of the table: ``(arch, scheme, N, K, M bucket)``

=========  ========================================================================================================
arch       ``"sm90"`` style name of the device (``"cpu"`` for CPU tensors: only synthetic tables have such rows)
scheme     :func:`scheme_name`: the operand dtypes and scale kinds, plus ``_silu`` for the fused SiLU*mul epilogue:
           ``bf16`` / ``fp16`` (16-bit x and W), ``w8_bf16`` / ``w8_fp16`` (e4m3 W, 16-bit x),
           ``fp8_row`` (e4m3 x with per-token scales, e4m3 W with per-channel scales: ``_scaled_mm`` row-wise),
           ``fp8_tensor`` (per-tensor x and W scales), ``fp8_mixed`` (one row-wise, one per-tensor);
           the static-FP8 output of the SiLU*mul epilogue adds ``_q8`` (``fp8_tensor_silu_q8``)
N, K       the weight's shape ``[N, K]`` (for ``_silu`` schemes N = 2I, the fused gate-up weight)
M bucket   the smallest of :data:`M_BUCKETS` (1, 8, 16, 32, 64) that is >= M
=========  ========================================================================================================

A table row holds the winning :class:`GemmConfig` of the sweep (``bench/tune_small_gemm.py``) and whether the kernel
beat the library call there (``F.linear`` / ``torch._scaled_mm``; for ``_silu`` schemes: the best unfused GEMM plus
``tpfuse.silu_mul``). The launcher takes a row's config whatever that flag says; :func:`route` (the model path's
question "use the kernel here?") answers with the config only where the flag is true. No row: :func:`default_config`
for the launcher, ``None`` (keep the library call) for :func:`route`.

Tables: ``tpfuse/thresholds/small_m_gemm_<arch>.json`` (shipped; rows only from a GPU sweep), or the file named by
``$TPFUSE_SMALL_M_GEMM_TABLE`` (a sweep's ``small_m_gemm_<arch>.json`` tried without committing it), or
:func:`install` (tests, benchmarks). Schema 1::

    {"schema": 1, "source": {"file": ..., "device": ..., "commit": ..., "date": ...} | null,
     "rows": [{"arch": "sm90", "scheme": "bf16", "n": 6144, "k": 4096, "m_bucket": 1,
               "config": {"block_n": 64, "block_k": 128, "split_k": 2, "num_warps": 4, "num_stages": 4},
               "beats_library": true, "kernel_us": 11.2, "library_us": 14.8}]}

:class:`GemmConfig` fields: ``block_n`` output columns per program (power of two 16..256; for ``_silu`` the gate
columns, the program also reads the matching up rows), ``block_k`` K elements per loop step (power of two 32..512),
``split_k`` programs along K (>= 1; > 1 adds the deterministic reduce kernel), ``num_warps``, ``num_stages``
(Triton's software pipeline depth of the weight / x loads).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, replace
from typing import Dict, Optional, Tuple

import tpfuse.thresholds
from tpfuse.quant import next_pow2

M_BUCKETS = (1, 8, 16, 32, 64)
MAX_M = 64
SUMSQ_ROWS = 32
"""Output columns per partial sum of squares of :func:`tpfuse.small_gemm.small_m_gemm_add` (its ``sumsq`` is
``[N / SUMSQ_ROWS, M]``); the kernel's tiles are at least this wide."""
DEFAULT_SMS = 132  # H100 / H200 SXM: the default split rule when the device is not a GPU (interpreter tests)
TABLE_DIR = os.path.dirname(os.path.abspath(tpfuse.thresholds.__file__))  # the package's folder, installed or not
ENV_TABLE = "TPFUSE_SMALL_M_GEMM_TABLE"

Key = Tuple[str, str, int, int, int]


@dataclass(frozen=True)
class GemmConfig:
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4
    tma: int = 0
    """1: the weight tiles come through a TMA descriptor (``small_m_gemm.weight_desc``: one bulk copy a tile, no
    per-thread address math or masks) instead of per-thread ``cp.async`` loads; ``block_k`` at most 256; no L2
    prefetch before the PDL wait. No shipped row asks for it: on one H100 at b05f6e3
    (``bench/results/small_gemm_h100_tma_b05f6e3.json``, ``tune_small_gemm.py --tma``: the 8B / 70B TP 1-8 shapes at
    M 1 / 16 / 64, bf16 and per-channel FP8, each tile also as its TMA twin) a TMA launch took 0.99x its pointer
    twin's time at the same tile and split (geometric mean of 1173 pairs; median 1.00, 10-90% 0.94-1.04), and that
    sweep's table (33 of its 108 rows TMA) made the shards' batch-1 step 1.004-1.006x as long as the same table on
    pointer loads (``e2e_tp1_h100_shards_tma_ab_b05f6e3.json``, rows ``_smallm`` vs ``_smallm_notma``)."""

    def as_dict(self) -> dict:
        """The fields as a table or sweep row stores them (``tma`` only where set: tables written before it
        existed stay as they were)."""
        d = asdict(self)
        if not self.tma:
            del d["tma"]
        return d

    def short(self) -> str:
        return f"n{self.block_n}k{self.block_k}s{self.split_k}w{self.num_warps}p{self.num_stages}" + \
            ("t" if self.tma else "")


@dataclass(frozen=True)
class Row:
    config: GemmConfig
    beats_library: bool


def m_bucket(m: int) -> int:
    """The smallest bucket >= ``m`` (``m`` in 1..64)."""
    for b in M_BUCKETS:
        if m <= b:
            return b
    return M_BUCKETS[-1]


_DT = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float8_e4m3fn": "fp8"}


def scheme_name(x_dtype, w_dtype, x_row: Optional[bool], w_row: Optional[bool], silu: bool = False,
                out_fp8: bool = False) -> Optional[str]:
    """The table's scheme of a call (module docstring), or None for a combination the kernel does not take.
    ``x_row`` / ``w_row``: the scale is row-wise (per token / per channel), per-tensor (False) or absent (None)."""
    xd, wd = _DT.get(str(x_dtype)), _DT.get(str(w_dtype))
    if xd is None or wd is None:
        return None
    if xd == "fp8":
        if wd != "fp8" or x_row is None or w_row is None:
            return None
        base = "fp8_row" if x_row and w_row else ("fp8_tensor" if not (x_row or w_row) else "fp8_mixed")
    elif wd == "fp8":
        base = f"w8_{xd}"
    elif wd == xd:
        base = xd
    else:
        return None
    return base + ("_silu" if silu else "") + ("_q8" if out_fp8 else "")


def weight_bytes(scheme: str) -> int:
    return 1 if scheme.startswith(("fp8", "w8")) else 2


def default_config(scheme: str, n: int, k: int, m: int, sms: int = DEFAULT_SMS) -> GemmConfig:
    """The rule without a table row: 64 output columns x 256 weight bytes of K per step (16-byte loads, 8 or 16
    elements per thread), 4 warps, 4 stages (3 with the fused SiLU*mul's two weight tiles), and split-K until the
    grid holds about two waves of programs on ``sms`` SMs, keeping >= 4 K steps per split."""
    silu = "_silu" in scheme
    n_out = n // 2 if silu else n
    block_k = min(256 // weight_bytes(scheme), max(32, next_pow2(k)))
    block_n = min(64, max(16, next_pow2(n_out)))
    tiles = -(-n_out // block_n)
    n_kb = -(-k // block_k)
    split = max(1, min(-(-2 * sms // tiles), n_kb // 4, 16))
    return GemmConfig(block_n=block_n, block_k=block_k, split_k=split, num_warps=4, num_stages=3 if silu else 4)


def sanitize(cfg: GemmConfig, n_out: int, k: int) -> GemmConfig:
    """``cfg`` made valid for a shape: powers of two in range, ``split_k`` at most the number of K steps."""
    def p2(v, lo, hi):
        return max(lo, min(hi, next_pow2(max(int(v), 1))))

    block_k = p2(cfg.block_k, 32, 256 if cfg.tma else 512)
    split = max(1, min(int(cfg.split_k), -(-k // block_k)))
    warps = cfg.num_warps if cfg.num_warps in (1, 2, 4, 8) else 4
    return replace(cfg, block_n=p2(cfg.block_n, 16, 256), block_k=block_k, split_k=split, num_warps=warps,
                   num_stages=max(1, min(6, int(cfg.num_stages))), tma=1 if cfg.tma else 0)


SMEM_BUDGET = 200 * 1024  # of Hopper's 227 KB per block: the main loop's stages must fit, with room (not swept)


def fit_stages(cfg: GemmConfig, block_m: int, w_bytes: int, x_bytes: int, silu: bool) -> int:
    """``num_stages`` lowered until the pipeline's buffers fit :data:`SMEM_BUDGET` (Triton keeps ``num_stages``
    copies of each loop tile in shared memory: the weight tile(s) and the x tile)."""
    per_stage = cfg.block_k * (cfg.block_n * w_bytes * (2 if silu else 1) + block_m * x_bytes)
    return max(1, min(cfg.num_stages, SMEM_BUDGET // per_stage))


# --------------------------------------------------------------------------------------------------------------
# tables


def config_from_dict(d: dict) -> GemmConfig:
    return GemmConfig(**{f: int(d[f]) for f in GemmConfig.__dataclass_fields__ if f in d})


def parse(table: dict) -> Dict[Key, Row]:
    """``{key: Row}`` of a schema-1 table (ValueError on anything else)."""
    if not isinstance(table, dict) or table.get("schema") != 1 or not isinstance(table.get("rows"), list):
        raise ValueError("small-M GEMM table: expected {'schema': 1, 'rows': [...]}")
    out = {}
    for r in table["rows"]:
        key = (str(r["arch"]), str(r["scheme"]), int(r["n"]), int(r["k"]), int(r["m_bucket"]))
        if key[4] not in M_BUCKETS:
            raise ValueError(f"small-M GEMM table: m_bucket {key[4]} is not one of {M_BUCKETS}")
        out[key] = Row(config_from_dict(r["config"]), bool(r["beats_library"]))
    return out


def table_path(arch: str) -> str:
    return os.environ.get(ENV_TABLE) or os.path.join(TABLE_DIR, f"small_m_gemm_{arch}.json")


_TABLES: Dict[str, Dict[Key, Row]] = {}  # arch -> rows (loaded once per process, or installed)
_INSTALLED: list = [None]  # rows installed by install(): they replace every file while set
ROUTE_MEMO: dict = {}  # :func:`memo`'s store (also read directly by tpfuse.small_gemm.route); cleared with tables


def rows_for(arch: str) -> Dict[Key, Row]:
    """The rows of ``arch``: the installed table, else its file (missing file: no rows)."""
    if _INSTALLED[0] is not None:
        return _INSTALLED[0]
    rows = _TABLES.get(arch)
    if rows is None:
        path = table_path(arch)
        rows = {}
        if os.path.isfile(path):
            with open(path) as fh:
                rows = {k: v for k, v in parse(json.load(fh)).items() if k[0] == arch}
        _TABLES[arch] = rows
    return rows


CONFIG_PROXY = {"fp8_row_silu": "fp8_tensor_silu_q8"}
"""Schemes the sweep has no rows of, and the swept scheme whose row gives their config where a table has it: the
per-token e4m3 gate-up + SiLU*mul with a bf16 output and its partial maxima (``small_m_gemm_amax``) streams the same
operand bytes per K step into the same two accumulators as the static-scale one with an e4m3 output (only the
epilogue's scale loads and store differ)."""


def lookup(arch: str, scheme: str, n: int, k: int, m: int, sms: int = DEFAULT_SMS) -> GemmConfig:
    """The launcher's config: the table row's (whether or not it beat the library; for a scheme of
    :data:`CONFIG_PROXY` without rows of its own, its proxy's row), else :func:`default_config`; sanitized for the
    shape."""
    rows, bucket = rows_for(arch), m_bucket(m)
    row = rows.get((arch, scheme, n, k, bucket))
    if row is None and scheme in CONFIG_PROXY:
        row = rows.get((arch, CONFIG_PROXY[scheme], n, k, bucket))
    cfg = row.config if row is not None else default_config(scheme, n, k, m, sms)
    return sanitize(cfg, n // 2 if "_silu" in scheme else n, k)


def route(arch: str, scheme: Optional[str], n: int, k: int, m: int) -> Optional[GemmConfig]:
    """The model path's question: the config to run the kernel with where the table says it beats the library at
    ``(arch, scheme, N, K, bucket(m))``; None (keep the library call) elsewhere, for ``m`` outside 1..64 and for
    schemes the kernel does not take. Callers on the hot path memoize it with :func:`memo`."""
    if scheme is None or not 1 <= m <= MAX_M:
        return None
    row = rows_for(arch).get((arch, scheme, n, k, m_bucket(m)))
    if row is None or not row.beats_library:
        return None
    return sanitize(row.config, n // 2 if "_silu" in scheme else n, k)


def has_routes(arch: str) -> bool:
    """Whether any row of ``arch`` routes to the kernel (the hot path's first, cheapest question)."""
    return any(r.beats_library for k, r in rows_for(arch).items() if k[0] == arch)


def memo(key, compute):
    """``compute()`` once per ``key`` (any hashable describing a call) until the tables change: the decode hot path
    pays one dict lookup per GEMM for its routing decision."""
    try:
        return ROUTE_MEMO[key]
    except KeyError:
        pass
    if len(ROUTE_MEMO) > 1 << 14:
        ROUTE_MEMO.clear()
    val = ROUTE_MEMO[key] = compute()
    return val


def clear_cache() -> None:
    """Forget loaded tables and memoized routes (after changing ``$TPFUSE_SMALL_M_GEMM_TABLE``)."""
    _TABLES.clear()
    ROUTE_MEMO.clear()


@contextlib.contextmanager
def install(table: Optional[dict]):
    """Use ``table`` (a schema-1 dict) instead of every file while active (tests, benchmarks); ``None`` = no
    rows at all."""
    old = _INSTALLED[0]
    _INSTALLED[0] = parse(table) if table is not None else {}
    ROUTE_MEMO.clear()
    try:
        yield
    finally:
        _INSTALLED[0] = old
        ROUTE_MEMO.clear()


_FORCED: list = [None]


@contextlib.contextmanager
def forced(cfg: Optional[GemmConfig]):
    """Every launch uses ``cfg`` (sanitized) while active: the sweep times its candidates with it."""
    old, _FORCED[0] = _FORCED[0], cfg
    try:
        yield
    finally:
        _FORCED[0] = old


def forced_config() -> Optional[GemmConfig]:
    return _FORCED[0]


def table_row(arch: str, scheme: str, n: int, k: int, bucket: int, cfg: GemmConfig, beats: bool,
              **extra) -> dict:
    """One row of a table file, as the sweep writes it."""
    return dict(arch=arch, scheme=scheme, n=n, k=k, m_bucket=bucket, config=cfg.as_dict(), beats_library=beats,
                **extra)
