"""Length-prefixed framing: a 4-byte big-endian length, then that many bytes of JSON.

The length comes first so that an oversized frame is refused from its header,
before a single byte of its payload is kept in memory: a peer cannot make the
REM-S buffer more than ``max_frame`` bytes per connection.
"""

from __future__ import annotations

import struct

__all__ = ["DEFAULT_MAX_FRAME", "HEADER", "FrameDecoder", "FrameError", "encode_frame"]

DEFAULT_MAX_FRAME = 2 * 1024 * 1024
HEADER = struct.Struct(">I")


class FrameError(ValueError):
    """The byte stream cannot be split into acceptable frames; ``code`` names why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def encode_frame(payload: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """Prefix *payload* with its length; refuse what the peer would refuse anyway."""
    if not payload:
        raise FrameError("empty_frame", "empty frame")
    if len(payload) > max_frame:
        raise FrameError("frame_too_large", f"frame of {len(payload)} bytes > {max_frame}")
    return HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Incremental decoder: feed bytes as they come, get whole payloads out.

    After a :class:`FrameError` the stream is desynchronised for good; the
    decoder stays failed and the connection must close.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        if not 1 <= max_frame <= 2**32 - 1:
            raise ValueError("max_frame must fit the 4-byte length")
        self.max_frame = max_frame
        self._buf = bytearray()
        self._need: int | None = None  # payload length once the header is read
        self._failed: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame (bounded by max_frame + header)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Consume *data*; return every payload it completes, in order."""
        if self._failed is not None:
            raise self._failed
        out: list[bytes] = []
        view = memoryview(data)
        while view:
            if self._need is None:
                take = min(HEADER.size - len(self._buf), len(view))
                self._buf += view[:take]
                view = view[take:]
                if len(self._buf) < HEADER.size:
                    break
                (length,) = HEADER.unpack(self._buf)
                self._buf.clear()
                if length == 0:
                    self._failed = FrameError("empty_frame", "empty frame")
                    raise self._failed
                if length > self.max_frame:
                    self._failed = FrameError(
                        "frame_too_large", f"frame of {length} bytes > {self.max_frame}"
                    )
                    raise self._failed
                self._need = length
            take = min(self._need - len(self._buf), len(view))
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) == self._need:
                out.append(bytes(self._buf))
                self._buf.clear()
                self._need = None
        return out
