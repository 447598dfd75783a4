"""Every Triton kernel compiles for Hopper (sm_90), checked on any machine (CPU included) so a GPU compile error
shows up in CI, not in scarce GPU time; and every kernel still compiles to the PTX instructions recorded in
tests/sm90_ptx_fingerprints.txt, the code that ran on GPUs (new kernels not yet run on a GPU: in
tests/sm90_ptx_pending.txt, checked alike and listed separately). Runs tests/sm90_compile_cases.py in a clean process
(not imported here: it compiles with the interpreter off)."""

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))
FINGERPRINTS = os.path.join(HERE, "sm90_ptx_fingerprints.txt")
PENDING = os.path.join(HERE, "sm90_ptx_pending.txt")  # new kernels: compiled, not yet run on a GPU


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TPFUSE_TRITON_CPU")}
    return subprocess.run([sys.executable, os.path.join(HERE, "sm90_compile_cases.py"), "--ptx-hashes"], env=env,
                          capture_output=True, text=True, timeout=900)


def read_fingerprints(path=FINGERPRINTS):
    """``(triton version, header text, {case: fingerprint})`` of a checked-in fingerprint file."""
    version, header, prints = None, [], {}
    if not os.path.exists(path):
        return triton.__version__, "", prints
    for line in open(path):
        if line.startswith("#"):
            header.append(line[1:].strip())
            if line.startswith("# triton "):
                version = line.split()[2]
        elif line.strip():
            fp, name = line.rstrip("\n").split("  ", 1)
            prints[name] = fp
    return version, " ".join(header), prints


def test_every_kernel_compiles_for_sm90(compiled):
    assert compiled.returncode == 0, compiled.stdout[-8000:] + compiled.stderr[-4000:]
    assert "all kernels compile for sm_90" in compiled.stdout
    assert compiled.stdout.count("ok   ") >= 40, compiled.stdout


def test_ptx_matches_the_recorded_fingerprints(compiled):
    version, header, ran = read_fingerprints()
    pending_version, _, pending = read_fingerprints(PENDING)
    assert not (ran.keys() & pending.keys()), f"cases in both {FINGERPRINTS} and {PENDING}"
    assert pending_version == version, f"{PENDING} was recorded with another Triton than {FINGERPRINTS}"
    recorded = {**ran, **pending}
    # another Triton generates other PTX: the fingerprints say nothing then, and a silent skip would hide that
    assert version == triton.__version__, (
        f"{FINGERPRINTS} was recorded with Triton {version}, this is Triton {triton.__version__}: install the pinned "
        f"one (pip install -e '.[test]'), or move the pin and regenerate ({header})")
    fresh = {}
    for line in compiled.stdout.splitlines():
        if line.startswith("ok   ") and "  ptx " in line:
            name, fp = line[5:].rsplit("  ptx ", 1)
            fresh[name] = fp
    changed = sorted(n for n in recorded.keys() & fresh.keys() if recorded[n] != fresh[n])
    missing = sorted(recorded.keys() - fresh.keys())
    new = sorted(fresh.keys() - recorded.keys())
    assert not (changed or missing or new), (
        "sm_90 PTX differs from the recorded fingerprints (GPU-tested, or pending a GPU run):\n"
        + "".join(f"  changed: {n}\n" for n in changed) + "".join(f"  no longer compiled: {n}\n" for n in missing)
        + "".join(f"  not recorded: {n}\n" for n in new) + f"{FINGERPRINTS}: {header}")


def test_pdl_variants_wait_before_they_touch_global_memory(compiled):
    """kernels/pdl.py's contract in the PTX of every PDL variant: nothing stored, loaded (but prefetch addresses)
    or triggered before the first griddepcontrol.wait."""
    lines = [ln for ln in compiled.stdout.splitlines() if ln.startswith("pdl-order ")]
    assert len(lines) >= 9, compiled.stdout[-4000:]
    assert not [ln for ln in lines if " BAD " in ln or ln.startswith("pdl-order BAD")], lines


def test_fp8_word_loads_have_no_byte_wide_shared_loads(compiled):
    """Decode attention on an e4m3 cache: the FP8_WORDS builds (kernels/decode_attention.py, off by default until
    timed on a GPU) move no tile through shared memory a byte at a time; the e4m3 tile loads' builds do (so the
    check can fail)."""
    counts = {ln.split("  ", 1)[1]: int(ln.split()[1]) for ln in compiled.stdout.splitlines()
              if ln.startswith("byte-smem-loads ")}
    words = {n: c for n, c in counts.items() if " words" in n}
    assert len(words) >= 8 and not any(words.values()), words
    assert all(c > 0 for n, c in counts.items() if " words" not in n), counts


def test_fused_combine_orders_its_ticket(compiled):
    """Decode attention with the combine in its split kernel (FUSE_COMBINE): in every build's PTX one acq_rel
    GPU-scope atomic, a CTA barrier between the partial stores and it, and one after it before the partial loads."""
    lines = [ln for ln in compiled.stdout.splitlines() if ln.startswith("ticket-order ")]
    assert len(lines) >= 16, compiled.stdout[-4000:]
    assert not [ln for ln in lines if " BAD " in ln], lines


def test_ticket_order_check_catches_what_it_should():
    sys.path.insert(0, HERE)
    from ptx_checks import ticket_order_problem

    ok = ("st.global.b32 [%rd1], %r1;\nbar.sync 0;\n@%p1 atom.global.gpu.acq_rel.add.u32 %r2, [%rd2], 1;\n"
          "bar.sync 0;\nld.global.cg.b32 %r3, [%rd1];")
    assert ticket_order_problem(ok) == ""
    assert "barrier between" in ticket_order_problem(ok.replace("bar.sync 0;\n@", "@", 1))
    assert "before any CTA barrier" in ticket_order_problem(ok.replace("1;\nbar.sync 0;\nld", "1;\nld"))
    assert "acq_rel" in ticket_order_problem(ok.replace(".acq_rel", ".relaxed"))
    assert "2 atomics" in ticket_order_problem(ok + "\natom.global.gpu.acq_rel.add.u32 %r4, [%rd2], 1;")
    assert "predicate" in ticket_order_problem(ok.replace("@%p1 atom", "atom"))


def test_pdl_order_check_catches_what_it_should():
    sys.path.insert(0, HERE)
    from ptx_checks import pdl_order_problem

    ok = "st.shared.b32 [%r1], %r2;\n{ .reg .pred p; @p prefetch.global.L2 [%rd2]; }\ngriddepcontrol.wait;\n" \
         "griddepcontrol.launch_dependents;\nst.global.b32 [%rd1], %r1;"
    assert pdl_order_problem(ok, may_load=False) == ""
    assert "ld.global" in pdl_order_problem("ld.global.b32 %r1, [%rd1];\ngriddepcontrol.wait;", may_load=False)
    assert pdl_order_problem("ld.global.b32 %r1, [%rd1];\ngriddepcontrol.wait;", may_load=True) == ""
    assert "st.global" in pdl_order_problem("@%p1 st.global.b32 [%rd1], %r1;\ngriddepcontrol.wait;", True)
    assert "launch_dependents" in pdl_order_problem("griddepcontrol.launch_dependents;\ngriddepcontrol.wait;", True)
    assert "cp.async" in pdl_order_problem("cp.async.cg.shared.global [%r1], [%rd1], 16;\ngriddepcontrol.wait;", True)
    assert pdl_order_problem("st.global.b32 [%rd1], %r1;", True) == "no griddepcontrol.wait"
