"""A safetensors file opened once: its header checked by lora_lite.validate, its tensors read from the same descriptor.

Everything comes from one open file, never from the path a second time, so a load racing an atomic re-save of
the same path (`save` renames a new file over it) sees one file whole: the header, the metadata and the tensors
all belong to the file that was opened. Tensors are read only when asked for, after the caller has checked the
header against the model, so a file whose names or shapes do not fit costs no more than its header.

Each tensor is read into its own buffer (`readinto`, no memory map): memory is the size of the tensors asked
for, and overwriting or truncating the file later (`cp new.safetensors adapter.safetensors` during training)
cannot crash the process with SIGBUS.
"""

from __future__ import annotations

import os
import sys

import torch

from . import validate
from .errors import CheckpointError


class CheckedFile:
    """`with CheckedFile(path) as f:` f.meta (metadata), f.entries ({tensor: (dtype, shape)}), f.read(keys).

    `what` names the caller in messages; `kind` says what the file was meant to be."""

    def __init__(self, path, what: str = "load()", kind: validate.FileKind = validate.ADAPTER_FILE):
        self.path = validate.check_path(path, what)
        # O_NONBLOCK: a FIFO swapped in after check_path's stat must not block the open; regular files ignore it
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        self._file = os.fdopen(fd, "rb")
        try:
            st = os.fstat(fd)
            validate.check_mode(st.st_mode, self.path)
            self.meta, self.entries, self._offsets = validate.read_header(self._file, st.st_size, self.path, kind)
        except BaseException:
            self._file.close()
            raise

    def read(self, keys) -> dict[str, torch.Tensor]:
        """{key: tensor} for these tensor names, each in memory of its own (little-endian, as safetensors stores)."""
        if sys.byteorder != "little":
            raise CheckpointError("lora-lite reads safetensors (little-endian) only on little-endian machines")
        out = {}
        for key in keys:
            (dtype, shape), (begin, end) = self.entries[key], self._offsets[key]
            buffer = bytearray(end - begin)
            self._file.seek(begin)
            if self._file.readinto(buffer) != len(buffer):
                raise CheckpointError(f"{str(self.path)!r} was truncated while it was being read (an in-place "
                                      "overwrite, not an atomic save); load it again")
            raw = torch.frombuffer(buffer, dtype=torch.uint8) if buffer else torch.empty(0, dtype=torch.uint8)
            out[key] = raw.view(dtype).reshape(shape)
        return out

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> CheckedFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
