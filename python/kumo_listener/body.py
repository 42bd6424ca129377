"""Reading a spilled message body as a file: `Message.open()` for a body the
server wrote to disk, with the message's own trace headers first and none
of the spill file's envelope lines."""

from __future__ import annotations

import io
import os


class SpilledBody(io.RawIOBase):
    """`head`, then `length` bytes of the file `fd` (owned) from `offset`."""

    def __init__(self, head: bytes, fd: int, offset: int, length: int) -> None:
        super().__init__()
        self._head = head
        self._fd = fd
        self._offset = offset
        self._size = len(head) + length
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        wanted = min(len(view), self._size - self._position)
        if wanted <= 0:
            return 0
        head_left = len(self._head) - self._position
        if head_left > 0:
            taken = min(wanted, head_left)
            view[:taken] = self._head[self._position : self._position + taken]
        else:
            start = self._offset + self._position - len(self._head)
            taken = os.preadv(self._fd, [view[:wanted]], start)
        self._position += taken
        return taken

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


def open_spilled(head: bytes, fd: int, offset: int, length: int) -> io.BufferedReader:
    return io.BufferedReader(SpilledBody(head, fd, offset, length))
