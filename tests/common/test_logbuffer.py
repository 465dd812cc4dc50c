"""The log's bounded buffer and background writer, on real OS pipes (a pipe nobody reads is the
real fault: its writer blocks once the kernel's 64 KiB are full)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import threading
import time
from collections.abc import Iterator

import pytest

from server.common.logbuffer import FileDescriptorSink, LineBuffer


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    """A pipe (read end non-blocking); both ends closed afterwards, which also ends a writer
    stalled on it (EPIPE)."""
    read_fd, write_fd = os.pipe()
    flags = fcntl.fcntl(read_fd, fcntl.F_GETFL)
    fcntl.fcntl(read_fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    try:
        yield read_fd, write_fd
    finally:
        os.close(read_fd)
        with contextlib.suppress(OSError):
            os.close(write_fd)


def read_available(fd: int) -> bytes:
    """Everything the pipe holds now."""
    chunks = []
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    return b"".join(chunks)


def test_lines_are_written_in_the_order_they_were_put(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    buffer = LineBuffer(FileDescriptorSink(write_fd), capacity_lines=100, flush_interval_s=0.01)
    for n in range(50):
        buffer.put(b"line %d\n" % n)
    assert buffer.flush(timeout_s=5)
    assert read_available(read_fd) == b"".join(b"line %d\n" % n for n in range(50))
    assert (buffer.written, buffer.dropped) == (50, 0)
    assert buffer.close(timeout_s=5)


def test_lines_wait_for_the_flush_interval_then_go_in_one_write(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    buffer = LineBuffer(FileDescriptorSink(write_fd), capacity_lines=100, flush_interval_s=3600)
    buffer.put(b"a\n")
    buffer.put(b"b\n")
    time.sleep(0.05)
    assert read_available(read_fd) == b""  # buffered, not written per line
    assert buffer.close(timeout_s=5)  # closing writes them
    assert read_available(read_fd) == b"a\nb\n"


def test_a_stalled_pipe_never_blocks_put_and_every_line_is_accounted_for(
    pipe: tuple[int, int],
) -> None:
    """Invariant: put() returns at once whatever the sink does, and each line is written,
    still buffered or counted as dropped; none vanishes."""
    _read_fd, write_fd = pipe  # nobody reads: the writer blocks once the pipe is full
    buffer = LineBuffer(FileDescriptorSink(write_fd), capacity_lines=100, flush_interval_s=0.01)
    line = b"x" * 199 + b"\n"
    slowest = 0.0
    for _ in range(2000):  # 400 KB: six times what the pipe holds
        started = time.perf_counter()
        buffer.put(line)
        slowest = max(slowest, time.perf_counter() - started)
        time.sleep(0.0001)  # let the writer run (and block)
    assert slowest < 0.05, f"put() took {slowest * 1000:.1f} ms"
    assert buffer.dropped > 0
    # Lines the writer took but has not finished writing (the blocked write) are in neither.
    in_flight = 2000 - buffer.written - buffer.buffered - buffer.dropped
    assert 0 <= in_flight <= 2000 - buffer.capacity_lines
    started = time.monotonic()
    assert not buffer.close(timeout_s=0.2)  # a stalled sink bounds the close, not the process
    assert time.monotonic() - started < 1.0


def test_a_failed_write_counts_its_lines_as_dropped() -> None:
    read_fd, write_fd = os.pipe()
    os.close(read_fd)  # nobody will ever read: writes fail with EPIPE
    try:
        buffer = LineBuffer(FileDescriptorSink(write_fd), capacity_lines=10, flush_interval_s=0.01)
        buffer.put(b"lost\n")
        buffer.put(b"lost too\n")
        buffer.flush(timeout_s=5)
        assert (buffer.written, buffer.dropped) == (0, 2)
        assert buffer.close(timeout_s=5)
    finally:
        os.close(write_fd)


def test_writers_sharing_one_pipe_never_split_each_others_lines() -> None:
    """Invariant: processes sharing a stderr pipe (`cluster`'s supervisor and nodes) each
    write whole lines of at most PIPE_BUF bytes, which the pipe never interleaves."""
    read_fd, write_fd = os.pipe()
    received = bytearray()

    def read_all() -> None:
        while chunk := os.read(read_fd, 1 << 16):
            received.extend(chunk)
            time.sleep(0.001)  # a slow reader: the pipe fills, writes block part-way

    reader = threading.Thread(target=read_all)
    reader.start()
    try:
        buffers = [
            LineBuffer(FileDescriptorSink(write_fd), capacity_lines=5000, flush_interval_s=0.01)
            for _ in range(2)
        ]
        for n in range(3000):
            for name, buffer in zip("ab", buffers, strict=True):
                buffer.put(b"%s%05d %s\n" % (name.encode(), n, name.encode() * 90))
        assert all(buffer.close(timeout_s=30) for buffer in buffers)
    finally:
        os.close(write_fd)
        reader.join(timeout=30)
        os.close(read_fd)
    lines = bytes(received).splitlines()
    assert len(lines) == 6000
    assert all(re.fullmatch(rb"([ab])\d{5} \1{90}", line) for line in lines)
