"""A bounded in-memory buffer of rendered log lines, written out by one background thread.

nginx's `access_log ... buffer=size flush=time`, for a Python process: whoever logs appends a
rendered line (bytes) and returns at once; a writer thread wakes every `flush_interval_s` (or
when asked) and writes everything buffered in as few writes as the sink allows.
The loop never waits on the log's disk or pipe: when the sink is slow or stalled, the buffer
fills to `capacity_lines` and further lines are dropped and counted (`dropped`), so a reader
can tell a gap from a quiet node.

Why not `logging.handlers.QueueListener`: it writes one record per `handle()` call, so the
writer wakes (and takes the GIL from the loop) once per line; `QueueHandler` raises on a full
queue instead of counting; and `QueueListener.stop()` joins its thread without a timeout, so a
node whose stderr nobody reads could never exit. This class is the part of it that is needed:
append, drop-and-count, batch write, bounded close.
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import stat
import threading
import time
import weakref
from typing import Protocol

DEFAULT_CAPACITY_LINES = 16384
DEFAULT_FLUSH_INTERVAL_S = 0.1
# One write() gets whole lines, at most this much of them (a longer line goes alone). To a
# pipe or socket, PIPE_BUF: a pipe takes such a write atomically, so the lines of processes
# sharing one stderr (`cluster`'s supervisor and nodes) never interleave mid-line, as with one
# write per line before. To a file or terminal, much more: every write() costs the writer a
# round trip through the GIL, which the loop pays for too.
PIPE_WRITE_BYTES = select.PIPE_BUF
FILE_WRITE_BYTES = 1 << 20


class LineSink(Protocol):
    """Where lines go: a binary stream (stderr's buffer, a file, a pipe)."""

    def write(self, data: bytes, /) -> object: ...

    def flush(self) -> object: ...


class FileDescriptorSink:
    """Writes to a file descriptor with `os.write`, holding no Python lock while it blocks.

    Why not `sys.stderr.buffer`: a writer stalled inside a `BufferedWriter` holds that
    object's lock, and the interpreter, flushing stderr as it exits, aborts ("could not
    acquire lock ... at interpreter shutdown, possibly due to daemon threads")."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        mode = os.fstat(fd).st_mode
        shared_stream = stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)
        self.max_write_bytes = PIPE_WRITE_BYTES if shared_stream else FILE_WRITE_BYTES

    def write(self, data: bytes, /) -> int:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        return len(data)

    def flush(self) -> None:
        """Nothing is held back: each write went to the descriptor."""


class LineBuffer:
    """Lines waiting to be written to `stream`, at most `capacity_lines` of them.

    `put` may be called from any thread and never blocks. Lines are written in the order they
    were put. `flush` and `close` wait for the writer at most the time they are given.
    """

    def __init__(
        self,
        stream: LineSink,
        capacity_lines: int = DEFAULT_CAPACITY_LINES,
        flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
    ) -> None:
        if capacity_lines < 1:
            raise ValueError(f"capacity_lines must be at least 1, not {capacity_lines}")
        if flush_interval_s <= 0:
            raise ValueError(f"flush_interval_s must be positive, not {flush_interval_s}")
        self.stream = stream
        self.capacity_lines = capacity_lines
        self.flush_interval_s = flush_interval_s
        self._early_wake_lines = max(1, capacity_lines // 8)
        # deque.append and popleft are atomic under the GIL: no lock on the put path.
        self._lines: collections.deque[bytes] = collections.deque()
        self._dropped = 0
        self._written = 0
        self._count_lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._writing = False
        self._thread = self._start_writer()
        alive = weakref.ref(self)  # the fork hook cannot be removed: let it not pin the buffer
        os.register_at_fork(after_in_child=lambda: _restart_in_child(alive))

    @property
    def dropped(self) -> int:
        """Lines given up: put while the buffer was full, or lost to a failed write."""
        return self._dropped

    @property
    def written(self) -> int:
        """Lines handed to the stream."""
        return self._written

    @property
    def buffered(self) -> int:
        """Lines waiting for the writer now."""
        return len(self._lines)

    def put(self, line: bytes) -> bool:
        """Queue one line (with its newline) for writing; False if it was dropped."""
        waiting = len(self._lines)
        if waiting >= self.capacity_lines or self._closing:
            self._count_dropped(1)
            return False
        self._lines.append(line)
        if waiting == self._early_wake_lines:
            self._wake.set()  # a burst: write now rather than at the next interval
        return True

    def flush(self, timeout_s: float) -> bool:
        """Wake the writer and wait until the buffer is empty and written; False if that
        took longer than `timeout_s` (a stalled sink, or lines arriving faster than it takes)."""
        deadline = time.monotonic() + timeout_s
        while self._lines or self._writing:
            if time.monotonic() >= deadline or not self._thread.is_alive():
                return False
            self._wake.set()
            time.sleep(0.002)
        return True

    def close(self, timeout_s: float) -> bool:
        """Write what is buffered and stop the writer, waiting at most `timeout_s`. Lines
        still buffered after that are counted as dropped. True if everything was written."""
        if self._closing:
            return not self._lines
        self._closing = True
        self._wake.set()
        self._thread.join(timeout_s)
        left = len(self._lines)
        if left or self._thread.is_alive():
            self._count_dropped(left)
            return False
        return True

    # --- the writer thread --------------------------------------------------------------------

    def _start_writer(self) -> threading.Thread:
        # A daemon: a stalled sink must not keep the process alive; close() bounds the wait.
        thread = threading.Thread(target=self._run, name="fm-log-writer", daemon=True)
        thread.start()
        return thread

    def _run(self) -> None:
        while True:
            if not self._closing:
                self._wake.wait(self.flush_interval_s)
                self._wake.clear()
            self._write_buffered()
            if self._closing and not self._lines:
                return

    def _write_buffered(self) -> None:
        # Only what is buffered now: lines put meanwhile wait for the next wake-up. Writing
        # "until empty" under load would loop for ever, taking the GIL back from the loop
        # after every write.
        lines = self._lines
        left = len(lines)
        max_bytes = getattr(self.stream, "max_write_bytes", FILE_WRITE_BYTES)
        self._writing = True
        try:
            while left:
                batch = [lines.popleft()]
                size = len(batch[0])
                left -= 1
                while left and size + len(lines[0]) <= max_bytes:
                    line = lines.popleft()
                    batch.append(line)
                    size += len(line)
                    left -= 1
                try:
                    self.stream.write(b"".join(batch))
                    self.stream.flush()
                except (OSError, ValueError):  # EPIPE, a closed stream: nobody will read these
                    self._count_dropped(len(batch))
                else:
                    with self._count_lock:
                        self._written += len(batch)
        finally:
            self._writing = False

    def _count_dropped(self, lines: int) -> None:
        with self._count_lock:
            self._dropped += lines

    def _after_fork_in_child(self) -> None:
        # The parent's writer thread does not exist in a forked child, and the parent writes
        # the lines it had buffered: start empty, with a writer of our own.
        self._lines.clear()
        self._count_lock = threading.Lock()
        self._wake = threading.Event()
        self._writing = False
        if not self._closing:
            with contextlib.suppress(RuntimeError):
                self._thread = self._start_writer()


def _restart_in_child(alive: weakref.ref[LineBuffer]) -> None:
    buffer = alive()
    if buffer is not None:
        buffer._after_fork_in_child()
