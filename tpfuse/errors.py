"""Exceptions raised by tpfuse.

Every input check runs before any collective, so when all ranks pass the same bad input every rank raises the same
error and no rank is left waiting in a collective. Mismatches that only show across ranks (one rank passes a
different token count) are caught by ``CommConfig(debug=True)``, which exchanges a call signature first. A peer
that does not arrive (it died, hangs, skipped a call, closed early, or rejected its own input) makes the waiting
ranks raise :class:`TPFusePeerError` / :class:`TPFusePeerTimeout` within ``CommConfig.timeout_s``.

Every exception tpfuse raises on purpose derives from :class:`TPFuseError`::

    TPFuseError (RuntimeError)
    +-- TPFuseInputError (also ValueError)      bad argument, shape, dtype, device, config
    |   +-- TPFuseTypeError (also TypeError)    an argument of the wrong type
    |   +-- ThresholdsError                     malformed thresholds table (names the file, row and field)
    +-- TPFuseUnsupportedError (also NotImplementedError)   a model feature or call form tpfuse does not run
    +-- TPFuseCheckpointError (also OSError)    a checkpoint directory or file is missing or unreadable
    |   +-- TPFuseCheckpointNotFound (also FileNotFoundError)
    +-- TPFuseMismatchError                     ranks made different calls (debug mode; a parallelized model's
    |                                           prefill calls always)
    +-- TPFuseClosedError                       use after close()
    +-- TPFusePeerError                         a peer failed: the communicator is broken from then on
        +-- TPFusePeerTimeout                   ... by not arriving within CommConfig.timeout_s
"""


class TPFuseError(RuntimeError):
    """Base class for tpfuse runtime errors."""


class TPFuseInputError(TPFuseError, ValueError):
    """A tensor or argument does not satisfy an op's contract (shape, dtype, device, layout)."""


class TPFuseTypeError(TPFuseInputError, TypeError):
    """An argument has the wrong type."""


class TPFuseUnsupportedError(TPFuseError, NotImplementedError):
    """The model or the call uses a feature tpfuse does not implement (the message names it)."""


class TPFuseCheckpointError(TPFuseError, OSError):
    """A checkpoint directory or file is missing, incomplete or unreadable (the message names the path)."""


class TPFuseCheckpointNotFound(TPFuseCheckpointError, FileNotFoundError):
    """A checkpoint directory or file does not exist (tpfuse reads local directories only, never the hub)."""


class TPFuseMismatchError(TPFuseError):
    """Ranks of one TP group made different calls: the communicator's ops in debug mode, a parallelized model's
    prefill calls always (their batch, lengths and token ids are compared before the first collective)."""


class TPFuseClosedError(TPFuseError):
    """The communicator was used after ``close()``."""


class ThresholdsError(TPFuseInputError):
    """A thresholds table is malformed or unreadable (the message names the file, and the row and field)."""


class TPFusePeerError(TPFuseError):
    """A peer of the TP group failed during a call: it closed its connection (died, exited, closed its
    communicator) or did not arrive in time. The communicator is broken afterwards: every later call raises this
    again at once; build a new one on every rank (re-initialise the process group first if a peer died)."""


class TPFusePeerTimeout(TPFusePeerError):
    """A peer did not arrive within ``CommConfig.timeout_s`` (it died, hangs, diverged, or skipped a call)."""
