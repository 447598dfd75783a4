"""The decode step's attention launches keep the occupancy of the plain split kernel when they fold in the RoPE and
cache write: for the 8B's heads at decode batches 1 / 8 / 64 on a 132-SM Hopper, bf16 and FP8 caches, with and
without the QK-norm, the rope-split kernel under its launcher's register cap (with and without its K / V prefetch
before the PDL wait) fits as many programs an SM as :func:`_split_kernel` of the same config (ptxas on the CPU:
tests/sm90_occupancy.py), without spills beyond a few bytes where the cap binds. A rope kernel that keeps more state
live across its tile loop shows here as one program an SM fewer (at batch 64 with a bf16 cache: 158 registers, one
program an SM instead of two, while the new key's score was taken after the loop and kept q's row layout live across
it). One exception, measured: the one-split 32-key tiles at batch 64 (``ONE_SPLIT_32``), one program an SM fewer.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TPFUSE_TRITON_CPU")}
    out = subprocess.run([sys.executable, os.path.join(HERE, "sm90_occupancy.py"), str(tmp_path_factory.mktemp("ptx"))],
                         env=env, capture_output=True, text=True, timeout=900, cwd=HERE)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_every_model_config_is_covered(rows):
    assert len(rows) == 12 and {(r["batch"], r["fp8"], r["qk_norm"]) for r in rows} == {
        (b, f, q) for b in (1, 8, 64) for f in (False, True) for q in (False, True)}


ONE_SPLIT_32 = [1, 128, 32, 4, 3]  # decode_attention.ONE_SPLIT_TILES' 32-key tiles at 4 warps (bf16 cache, B 64)
ONE_SPLIT_32_ROPE_PROGRAMS = 4
"""Programs an SM of the rope kernel at :data:`ONE_SPLIT_32` (116 registers uncapped; the split kernel: 96, 5 an
SM). The build timed end to end (``e2e_tp1_h100_tile_ab_2b81c2e.json``: 0.98x the 128-key tiles' step at batch
64); a cap of 96 registers fits 5 but spills 56-64 bytes (ptxas offline), not timed, so not taken."""


def test_rope_kernel_fits_as_many_programs_as_the_split_kernel(rows):
    def wanted(r):
        return ONE_SPLIT_32_ROPE_PROGRAMS if r["config"] == ONE_SPLIT_32 and not r["fp8"] else r["split"][3]

    worse = [r for r in rows if min(r["rope"][3], r["rope_prefetch"][3]) < wanted(r)]
    assert not worse, json.dumps(worse, indent=1)


def test_register_cap_spills_at_most_a_few_bytes(rows):
    for r in rows:
        limit = 16 if (r["rope_cap"] and r["qk_norm"]) else 0  # 12 bytes: the QK-norm's rows under the cap
        assert r["rope"][1] <= limit and r["rope_prefetch"][1] <= limit, r
        assert r["split"][1] == 0, r
