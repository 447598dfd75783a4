"""A bounded-memory reader of safetensors files: copies one tensor, or a row / column range of it, into a
destination tensor (on any device) through one reusable host buffer of a few MiB.

Why not ``safe_open``: it memory-maps the file, and every page it reads stays mapped in the process, so its
resident set grows towards the whole tensor - and a column slice (row-parallel weights) touches every page of the
full tensor. Plain ``readinto`` reads go through the page cache, which is not part of the process's memory, so a
rank's host memory stays about one buffer whatever the checkpoint size.

File format (https://github.com/huggingface/safetensors): 8-byte little-endian header size ``n``, ``n`` bytes of
JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data
(offsets relative to its start, row-major, little-endian).
"""

from __future__ import annotations

import json
import math
import struct
from typing import Dict, Optional, Tuple

import torch

from ..errors import TPFuseCheckpointError, TPFuseUnsupportedError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
          "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
CHUNK_BYTES = 32 << 20
"""Host staging buffer per read (rows of a tensor are read in chunks of at most this size)."""


class SafetensorsFile:
    """One open ``.safetensors`` file: ``keys()``, ``shape(name)``, ``dtype(name)`` and :meth:`read_into`."""

    def __init__(self, path: str):
        self.path = path
        self._fh = open(path, "rb", buffering=0)
        (n,) = struct.unpack("<Q", self._fh.read(8))
        header = json.loads(self._fh.read(n))
        header.pop("__metadata__", None)
        self._meta: Dict[str, dict] = header
        self._data_start = 8 + n
        self._buf: Optional[bytearray] = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._fh.close()
        self._buf = None

    def keys(self):
        return list(self._meta)

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._meta[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        code = self._meta[name]["dtype"]
        if code not in DTYPES:
            raise TPFuseUnsupportedError(f"{self.path}: tensor {name} has dtype {code}, which tpfuse does not read")
        return DTYPES[code]

    def _buffer(self, nbytes: int) -> torch.Tensor:
        if self._buf is None or len(self._buf) < nbytes:
            self._buf = bytearray(max(nbytes, CHUNK_BYTES))
        return torch.frombuffer(self._buf, dtype=torch.uint8)

    def read_into(self, name: str, dst: torch.Tensor, dim: Optional[int] = None, start: int = 0,
                  end: Optional[int] = None) -> None:
        """Copy tensor ``name`` into ``dst`` (cast to ``dst``'s dtype, moved to its device): the whole tensor
        (``dim=None``), rows ``[start, end)`` (``dim=0``) or columns ``[start, end)`` of a 2-D tensor
        (``dim=1``). ``dst`` must have the shape of what is read."""
        shape, dt = self.shape(name), self.dtype(name)
        rows = shape[0] if shape else 1
        row_shape = shape[1:]
        item = torch.empty((), dtype=dt).element_size()
        row_bytes = math.prod(row_shape) * item
        r0, r1 = (start, end) if dim == 0 else (0, rows)
        cols = (start, end) if dim == 1 else None
        out = dst.view(1, *dst.shape) if not shape else dst
        per = max(1, CHUNK_BYTES // max(row_bytes, 1))
        begin = self._data_start + self._meta[name]["data_offsets"][0]
        for a in range(r0, r1, per):
            b = min(a + per, r1)
            nbytes = (b - a) * row_bytes
            buf = self._buffer(nbytes)
            self._fh.seek(begin + a * row_bytes)
            view = memoryview(self._buf)[:nbytes]
            got = 0
            while got < nbytes:  # readinto may legally return fewer bytes (signals, network file systems)
                n = self._fh.readinto(view[got:])
                if not n:
                    raise TPFuseCheckpointError(f"{self.path}: file ends inside {name} ({got} of {nbytes} bytes read)")
                got += n
            src = buf[:nbytes].view(dt).view(b - a, *row_shape)
            if cols is not None:
                src = src[:, cols[0]:cols[1]]
            out[a - r0:b - r0].copy_(src)
