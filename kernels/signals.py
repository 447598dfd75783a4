"""Bounded signals between the ranks of a symmetric-memory workspace, in Triton.

Device primitives (``@triton.jit`` helpers, inlined into the kernels that call them; also used by
:mod:`tpfuse.kernels.fused_allreduce`):

* ``_now()``: ``%globaltimer`` in ns;
* ``_peer(ptr, delta_ptr, p, ELEM)``: ``ptr`` moved into peer ``p``'s buffer (``delta_ptr[p]``: byte distance
  from this rank's symmetric buffer to peer ``p``'s, a multiple of ``16 * ELEM`` bytes: symmetric allocations are
  2 MiB aligned);
* ``_signal(flag_ptr, delta_ptr, slot, value, p)``: store ``value`` into peer ``p``'s flag ``slot`` (release,
  system scope): a monotonic flag;
* ``_wait(flag_ptr, slot, target, deadline)``: spin (acquire, system scope) until ``flag >= target`` (wrap-around
  safe) or ``deadline``; returns 1 if it timed out.

Stream-level counting semaphores (``launch_semaphore``: one tiny kernel, one program of one warp) for paths whose
data moves by copy engines between kernels (:mod:`tpfuse.backends.async_tp`). Flags: one int32 per
``(channel, source rank)`` in the receiver's symmetric flag array, at ``channel * WORLD + src``; one local int32
at ``err_slot`` mirrors the host error word.

1. signal: ``+1`` (atomic add, release, system scope) on ``flag[sig_base + RANK]`` of every peer in ``sig_mask``;
2. wait: for every peer ``p`` in ``wait_mask``, spin (acquire, system scope) until ``flag[wait_base + p] >= n``,
   then subtract ``n`` (atomic, so a peer's concurrent ``+1`` is never lost). Every wait is bounded by
   ``timeout_ns`` of ``%globaltimer`` from the kernel's start: on expiry the kernel sets ``flag[err_slot] = 1`` and
   the pinned host word ``err[0] = 1`` (the host reads it without a sync) and returns without consuming. A kernel
   that finds ``flag[err_slot]`` already set does not wait at all, so a broken workspace costs one timeout, not
   one per wait.

Counting makes the flags replay-safe in CUDA graphs as long as every call signals exactly as often as its peers
wait (each call returns every flag to where it started); a peer may run ahead by whole calls without a signal
being lost. A timed-out wait leaves the counts unbalanced: the workspace must be treated as broken from then on.

Cross-rank ordering (NVLink). N ranks on one GPU share one L2, so a flag hardly overtakes data there; across GPUs it
can unless the writer releases and the reader acquires at *system* scope (``.gpu`` is not enough). Reviewed on the
sm_90 PTX / SASS (tests/test_signals_kernel.py's compile, TP 2/4/8): no ``.gpu`` atomic, no separate fence (the
release / acquire atomics carry it).

=================  ============  ========================================  ===============================  ===========
flag / wait        line          orders                                    used -> PTX                      verdict
=================  ============  ========================================  ===============================  ===========
``_signal``        81            the caller's stores before its            release, sys, thread 0 ->        correct
                                 ``tl.debug_barrier`` -> the peer's flag   ``atom.global.sys.release.exch``
``_wait``          87, 90        the flag -> the caller's loads after its  acquire, sys, thread 0 ->        correct
                                 ``tl.debug_barrier``                      ``ld.global.sys.acquire.b32``
semaphore signal   101           earlier work of the stream (copies,       release, sys ->                  correct (1)
                                 GEMMs) -> the peer's counter              ``atom.global.sys.release.add``
semaphore wait     108           the counter -> later work of the stream   ``_wait``                        correct (1)
consume            110           nothing (same word as the wait)           ``atom.global.sys.relaxed.add``  correct
error word         103, 112-113  local (own flag, pinned host word)        volatile load, plain stores      n/a
=================  ============  ========================================  ===============================  ===========

SASS: each release is ``MEMBAR.ALL.SYS`` + ``ATOMG`` / ``REDG .STRONG.SYS``; each acquire ``LDG.E.STRONG.SYS`` +
``CCTL.IVALL`` (L1 invalidated). (1) The data a semaphore orders is moved by other operations of the same stream
(:mod:`tpfuse.backends.async_tp`: READY: my copy into my ``ag`` slot -> the peers' pulls; DONE: my pulls -> the
peer's reuse of its slot; DATA: my push into the peer's ``rs`` slot -> its ``reduce_slots`` kernel; BAR: my
``reduce_slots`` reads -> the peers' next pushes). The argument is CUDA stream order (an operation, a copy engine's
NVLink writes included, completes before the next one starts) chained with the system-scope release / acquire:
sound, and the assumption torch symmetric memory's copy-engine paths make, but outside the PTX memory model.
Open: none.
"""

import triton
import triton.language as tl


@triton.jit
def _now():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                     pack=1)


@triton.jit
def _peer(ptr, delta_ptr, p, ELEM: tl.constexpr):
    """``ptr`` moved into peer ``p``'s workspace (``delta_ptr[p]``: byte distance, multiple of 16)."""
    d = tl.load(delta_ptr + p) // ELEM
    return ptr + tl.multiple_of(d, 16)


@triton.jit
def _signal(flag_ptr, delta_ptr, slot, value, p):
    # flag_ptr: this rank's int32 flag array; slot: index of the flag in the peer's array
    tl.atomic_xchg(_peer(flag_ptr, delta_ptr, p, 4) + slot, value, sem="release", scope="sys")


@triton.jit
def _wait(flag_ptr, slot, target, deadline):
    """Spin until ``flag >= target`` (wrap-around safe) or the deadline; returns 1 if it timed out."""
    v = tl.atomic_add(flag_ptr + slot, 0, sem="acquire", scope="sys")
    now = _now()
    while ((v - target) < 0) & (now <= deadline):
        v = tl.atomic_add(flag_ptr + slot, 0, sem="acquire", scope="sys")
        now = _now()
    return ((v - target) < 0).to(tl.int32)


@triton.jit(do_not_specialize=["timeout_ns", "sig_base", "sig_mask", "wait_base", "wait_mask", "wait_n"])
def _semaphore_kernel(flag_ptr, delta_ptr, err_ptr, timeout_ns, err_slot, sig_base, sig_mask, wait_base, wait_mask,
                      wait_n, RANK: tl.constexpr, WORLD: tl.constexpr):
    for p in tl.static_range(WORLD):
        if p != RANK:
            if ((sig_mask >> p) & 1) != 0:
                tl.atomic_add(_peer(flag_ptr, delta_ptr, p, 4) + sig_base + RANK, 1, sem="release", scope="sys")
    deadline = _now() + timeout_ns
    bad = tl.load(flag_ptr + err_slot, volatile=True)  # an earlier wait timed out: the workspace is broken
    for p in tl.static_range(WORLD):
        if p != RANK:
            if ((wait_mask >> p) & 1) != 0:
                if bad == 0:
                    bad = _wait(flag_ptr, wait_base + p, wait_n, deadline)
                    if bad == 0:
                        tl.atomic_add(flag_ptr + wait_base + p, -wait_n, sem="relaxed", scope="sys")
    if bad != 0:
        tl.store(flag_ptr + err_slot, 1)
        tl.store(err_ptr, 1)


def peer_mask(peers) -> int:
    """Bit mask of peer ranks (``sig_mask`` / ``wait_mask``)."""
    m = 0
    for p in peers:
        m |= 1 << p
    return m


def launch_semaphore(flags, deltas, err, timeout_ns: int, err_slot: int, rank: int, world: int, *,
                     sig_base: int = 0, sig_mask: int = 0, wait_base: int = 0, wait_mask: int = 0,
                     wait_n: int = 1) -> None:
    """One semaphore kernel on the current stream: signal the peers in ``sig_mask`` on ``sig_base``, then wait for
    ``wait_n`` signals from each peer in ``wait_mask`` on ``wait_base`` (see the module docstring)."""
    # num_warps=1 is part of the protocol: Triton issues a scalar atomic once per warp, so every extra warp would
    # add one more +1 per signal (tests/test_signals_kernel.py checks the PTX)
    _semaphore_kernel[(1,)](flags, deltas, err, int(timeout_ns), err_slot, sig_base, sig_mask, wait_base, wait_mask,
                            wait_n, RANK=rank, WORLD=world, num_warps=1)
