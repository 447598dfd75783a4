"""Exceptions raised by tpfuse.

Every input check runs before any collective, so when all ranks pass the same bad input every rank raises the same
error and no rank is left waiting in a collective. Mismatches that only show across ranks (one rank passes a
different token count) are caught by ``CommConfig(debug=True)``, which exchanges a call signature first.
"""


class TPFuseError(RuntimeError):
    """Base class for tpfuse runtime errors."""


class TPFuseInputError(TPFuseError, ValueError):
    """A tensor or argument does not satisfy an op's contract (shape, dtype, device, layout)."""


class TPFuseMismatchError(TPFuseError):
    """Ranks of one TP group called the communicator with different arguments (detected in debug mode)."""


class TPFuseClosedError(TPFuseError):
    """The communicator was used after ``close()``."""


class TPFusePeerTimeout(TPFuseError):
    """A peer did not arrive within ``CommConfig.timeout_s`` (it died, diverged, or skipped a call)."""
