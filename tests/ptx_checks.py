"""Checks on compiled PTX text (no Triton needed): used by tests/sm90_compile_cases.py on every PDL variant and
unit-tested in tests/test_sm90_compile.py."""

_BEFORE_WAIT = ("st.global", "atom.", "red.", "cp.async", "griddepcontrol.launch_dependents")


def pdl_order_problem(ptx: str, may_load: bool) -> str:
    """What breaks kernels/pdl.py's contract in a PDL variant's PTX ("" if nothing): the first
    ``griddepcontrol.wait`` must come before any global store, atomic, ``cp.async`` load and the trigger, and before
    any global load unless the case prefetches through addresses it loads (``may_load``: the decode attention's
    lengths and block tables). Shared-memory traffic before the wait is the program's own and allowed."""
    ops = []  # each instruction's opcode (a predicate guard "@%p1" dropped)
    for ln in ptx.splitlines():
        words = ln.split()
        if words and words[0].startswith("@"):
            words = words[1:]
        ops.append(words[0] if words else "")
    waits = [i for i, op in enumerate(ops) if op.startswith("griddepcontrol.wait")]
    if not waits:
        return "no griddepcontrol.wait"
    banned = _BEFORE_WAIT + (() if may_load else ("ld.global",))
    early = [op for op in ops[: waits[0]] if op.startswith(banned)]
    return f"before the first wait: {early[0]}" if early else ""
