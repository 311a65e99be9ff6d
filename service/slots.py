"""What an HTTP worker and the engine process share: image slots in memory, and the records
they send each other over a Unix socket.

Each worker owns one anonymous shared-memory file (``memfd``) of ``slots`` slots. A slot
holds one preprocessed image, written by the worker, and that image's packed score rows
(:func:`service.inference.row_widths`) and error id, written by the engine. The file
descriptor is handed over once, when the worker connects; after that the only traffic is
4-byte records: the worker sends a slot number when the slot's image is ready, the engine
sends it back, with a status, when its rows are. Images never pass through a pipe, and
nothing is pickled per request. The memory is freed when both processes have let go of it,
however either of them ends.

The connection starts with a hello, fixed in size: the worker's slot count and pid, with
the descriptor attached; the engine answers with one JSON line (:class:`EngineInfo`).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import asdict, dataclass

import torch

from service.inference import row_widths

RECORD = 4  # bytes: uint32, little-endian
STATUS_SHIFT = 24  # slot numbers stay below 2**24; the byte above is the status
OK, FAILED = 0, 1
HELLO = struct.Struct("<II")  # slots, pid
ERROR_ID_BYTES = 8  # service.errors.new_error_id: 16 hex digits


@dataclass(frozen=True)
class EngineInfo:
    """What the engine tells each worker when it connects."""

    device: str
    dtype: str
    max_batch_size: int

    def to_line(self) -> bytes:
        import json

        return json.dumps(asdict(self)).encode() + b"\n"


class SlotArrays:
    """Tensor views of one worker's shared memory."""

    def __init__(self, buffer: mmap.mmap, slots: int, input_shape: tuple[int, ...],
                 num_classes: int):
        self.slots = slots
        floats, ints = row_widths(num_classes)
        self.inputs, offset = _view(buffer, 0, torch.float32, (slots, *input_shape))
        self.floats, offset = _view(buffer, offset, torch.float32, (slots, floats))
        self.ints, offset = _view(buffer, offset, torch.int32, (slots, ints))
        self.error_ids, _ = _view(buffer, offset, torch.uint8, (slots, ERROR_ID_BYTES))

    @staticmethod
    def nbytes(slots: int, input_shape: tuple[int, ...], num_classes: int) -> int:
        floats, ints = row_widths(num_classes)
        image = 4 * int(torch.Size(input_shape).numel())
        return slots * (image + 4 * floats + 4 * ints + ERROR_ID_BYTES)

    @classmethod
    def create(cls, slots: int, input_shape: tuple[int, ...],
               num_classes: int) -> tuple[SlotArrays, int]:
        """New shared memory for a worker, and its file descriptor to hand over."""
        fd = os.memfd_create("oodserve-slots", os.MFD_CLOEXEC)
        size = cls.nbytes(slots, input_shape, num_classes)
        os.ftruncate(fd, size)
        return cls(mmap.mmap(fd, size), slots, input_shape, num_classes), fd

    @classmethod
    def attach(cls, fd: int, slots: int, input_shape: tuple[int, ...],
               num_classes: int) -> SlotArrays:
        """The engine's view of a worker's memory; the descriptor is closed (the mapping
        keeps the memory)."""
        try:
            size = cls.nbytes(slots, input_shape, num_classes)
            if os.fstat(fd).st_size != size:
                raise ValueError(f"shared memory of {os.fstat(fd).st_size} bytes, expected "
                                 f"{size} for {slots} slots")
            return cls(mmap.mmap(fd, size), slots, input_shape, num_classes)
        finally:
            os.close(fd)


def _view(buffer: mmap.mmap, offset: int, dtype: torch.dtype,
          shape: tuple[int, ...]) -> tuple[torch.Tensor, int]:
    count = int(torch.Size(shape).numel())
    tensor = torch.frombuffer(buffer, dtype=dtype, count=count, offset=offset).view(shape)
    return tensor, offset + count * tensor.element_size()


def encode(slots: list[int], status: int = OK) -> bytes:
    return struct.pack(f"<{len(slots)}I", *(s | status << STATUS_SHIFT for s in slots))


class RecordReader:
    """Whole records out of a byte stream that may split them anywhere."""

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, data: bytes) -> list[tuple[int, int]]:
        """``(slot, status)`` pairs of the whole records received so far."""
        data = self._rest + data
        whole = len(data) - len(data) % RECORD
        self._rest = data[whole:]
        values = struct.unpack(f"<{whole // RECORD}I", data[:whole])
        mask = (1 << STATUS_SHIFT) - 1
        return [(v & mask, v >> STATUS_SHIFT) for v in values]
