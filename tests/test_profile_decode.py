"""``bench/profile_decode.py``'s kernel counts per decoder layer (what the decode profile reports)."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))


def test_profile_kernel_counts_per_layer():
    import profile_decode

    rows = [{"kernel": "nvjet_gemm", "calls_per_step": 16.0, "us_per_step": 300.0},  # 4 per layer
            {"kernel": "decode_attention", "calls_per_step": 4.0, "us_per_step": 40.0},
            {"kernel": "lm_head_gemm", "calls_per_step": 1.0, "us_per_step": 50.0},
            {"kernel": "argmax", "calls_per_step": 1.0, "us_per_step": 2.0},
            {"kernel": "Memcpy DtoD (Device -> Device)", "calls_per_step": 3.0, "us_per_step": 3.0}]
    counts = profile_decode.kernel_counts(rows, layers=4)
    assert counts == dict(kernels_per_step=22.0, kernels_per_layer=5.5, layer_kernels_per_layer=5.0,
                          other_kernels_per_step=2.0, copies_per_step=3.0)
    assert [r["calls_per_layer"] for r in rows] == [4.0, 1.0, 0.25, 0.25, 0.75]


def test_layers_full_profiles_the_real_vocab():
    """``--layers full`` profiles the model the e2e rows time: all its layers and its real vocabulary (the
    profiles of 1af4e65 / 73f3e7a resolved the layers first and got the 32000-token default)."""
    import e2e_models as em
    import profile_decode

    full = profile_decode.parse_args(["--model", "8B", "--layers", "full"])
    assert full.layers == em.REAL["8B"][0] and full.vocab == em.REAL["8B"][1] == 128256
    assert profile_decode.parse_args(["--layers", "4"]).vocab == em.VOCAB
    assert profile_decode.parse_args(["--layers", "full", "--vocab", "1000"]).vocab == 1000


def test_exposed_times_attribute_the_timeline_under_overlap():
    """A kernel that starts early and waits (PDL) adds only what it ends past the one before; a gap counts on the
    kernel after it; a kernel inside another's span adds nothing; the sum is the span."""
    import profile_decode

    spans = [(0.0, 10.0, "gemm"), (8.0, 13.0, "attn"), (9.0, 12.0, "tiny"), (15.0, 16.0, "norm"),
             (14.0, 20.0, "gemm")]
    got = profile_decode.exposed_times(spans)
    assert got == {"gemm": 10.0 + 7.0, "attn": 3.0, "tiny": 0.0, "norm": 0.0}  # 13 -> 20: the gap 13-14 too
    assert sum(got.values()) == 20.0
    assert profile_decode.exposed_times([]) == {}


def test_plot_exposed_draws_the_profile(tmp_path):
    """The profile's PNG: drawn where matplotlib is installed and the rows carry exposed times, else None."""
    import common
    import profile_decode

    rows = [{"kernel": f"k{i}", "calls_per_step": 1.0, "us_per_step": 10.0 + i, "exposed_us_per_step": 5.0 + i}
            for i in range(15)]
    hdr = {"model": "8B", "batch": 1, "context": 1024, "pdl": True, "span_us_per_step": 200.0, "device": "cpu",
           "commit": "x"}
    got = profile_decode.plot_exposed(hdr, rows, str(tmp_path / "p.png"))
    if common.pyplot() is None:
        assert got is None
    else:
        assert got == str(tmp_path / "p.png") and (tmp_path / "p.png").stat().st_size > 0
    old = [{k: v for k, v in r.items() if k != "exposed_us_per_step"} for r in rows]
    assert profile_decode.plot_exposed(hdr, old, str(tmp_path / "q.png")) is None


def test_slot_times_split_a_kernel_by_its_launch_within_the_layer():
    """A kernel launched twice a layer (2 steps x 2 layers) gets per-slot kernel and exposed times per step; one
    launched once a layer or not a multiple of the layers (the final norm) gets none; a late second launch's wait
    shows as exposed time of its slot."""
    import profile_decode

    spans, t = [], 0.0
    for _ in range(2):
        for _ in range(2):
            for name, dur, gap in (("gemm", 3.0, 0.0), ("norm", 1.0, 0.0), ("gemm", 5.0, 2.0)):
                spans.append((t + gap, t + gap + dur, name))
                t += gap + dur
        spans.append((t, t + 1.0, "final"))
        t += 1.0
    got = profile_decode.slot_times(spans, steps=2, layers=2)
    assert set(got) == {"gemm"}
    assert got["gemm"] == [[6.0, 6.0], [10.0, 14.0]]
