"""Checks on compiled PTX text (no Triton needed): used by tests/sm90_compile_cases.py on every PDL variant and
unit-tested in tests/test_sm90_compile.py."""

def opcodes(ptx: str) -> list:
    """Each PTX line's opcode ("" for none), a predicate guard ("@%p1") dropped."""
    ops = []
    for ln in ptx.splitlines():
        words = ln.split()
        if words and words[0].startswith("@"):
            words = words[1:]
        ops.append(words[0] if words else "")
    return ops


_BEFORE_WAIT = ("st.global", "atom.", "red.", "cp.async", "griddepcontrol.launch_dependents")


def pdl_order_problem(ptx: str, may_load: bool) -> str:
    """What breaks kernels/pdl.py's contract in a PDL variant's PTX ("" if nothing): the first
    ``griddepcontrol.wait`` must come before any global store, atomic, ``cp.async`` load and the trigger, and before
    any global load unless the case reads ahead of the wait what earlier kernels wrote (``may_load``: the decode
    attention's prefetches through its lengths and block tables, its hoisted reads, ``HOIST_LOADS``).
    Shared-memory traffic before the wait is the program's own and allowed."""
    ops = opcodes(ptx)
    waits = [i for i, op in enumerate(ops) if op.startswith("griddepcontrol.wait")]
    if not waits:
        return "no griddepcontrol.wait"
    banned = _BEFORE_WAIT + (() if may_load else ("ld.global",))
    early = [op for op in ops[: waits[0]] if op.startswith(banned)]
    return f"before the first wait: {early[0]}" if early else ""


def ticket_order_problem(ptx: str) -> str:
    """What breaks the fused combine's ordering (kernels/decode_attention.py ``_finish_fused``) in a PTX ("" if
    nothing): exactly one atomic, ``acq_rel`` at GPU scope, under a predicate (Triton issues a scalar atomic from
    one thread); a CTA barrier between the partial stores before it and
    the atomic (every thread's stores precede the one thread's release); a CTA barrier after it before any global
    load (the ticket's acquire precedes every thread's partial loads)."""
    ops = opcodes(ptx)
    atoms = [i for i, op in enumerate(ops) if op.startswith("atom.")]
    if len(atoms) != 1:
        return f"{len(atoms)} atomics, want 1"
    a = atoms[0]
    if ".acq_rel" not in ops[a] or ".gpu" not in ops[a]:
        return f"the atomic is {ops[a]}, want acq_rel at gpu scope"
    if not ptx.splitlines()[a].split()[0].startswith("@"):
        return "the atomic has no predicate guard: every thread would draw a ticket"
    stores = [i for i, op in enumerate(ops[:a]) if op.startswith("st.global")]
    if not stores or not any(op.startswith("bar.sync") for op in ops[stores[-1]:a]):
        return "no CTA barrier between the partial stores and the atomic"
    loads = [i for i, op in enumerate(ops[a:], a) if op.startswith("ld.global")]
    if loads and not any(op.startswith("bar.sync") for op in ops[a:loads[0]]):
        return "a global load after the atomic before any CTA barrier"
    return ""
