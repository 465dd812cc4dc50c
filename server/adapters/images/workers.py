"""Image work in a separate, low-priority process; admission of uploads to it.

Why a process and not threads of the node: measured with 1,000 WebSocket subscribers on 2
cores (docs/decisions.md, Images), rendering uploads on threads of the node's own process
took broadcast p99 to 2.5x its idle figure, even with those threads at nice 10 or
SCHED_IDLE. The CPU they burn is charged to the node's scheduling group (Linux autogroup),
so when the event loop wakes for a broadcast it waits behind other groups; and each GIL
hand-off to a low-priority thread stalls the loop until that thread is scheduled. The same
work in a process of its own, in its own session (hence its own autogroup) with a low
group priority, left p99 where it was idle.

The worker is a plain child process (`python -c`, in a new session), not a
`multiprocessing` one: those re-import the parent's main module (for `finalmarket serve`,
the whole server: 0.7 s of CPU and tens of MB per worker), start at the node's priority, and
need helper threads in the node that hold the GIL while they pickle uploads. The child lowers
its priority before importing anything, then reads jobs from its stdin and writes results to
its stdout, each a length-prefixed pickle; the node's side is asyncio streams and one reader
task. An upload's job names its spool file (server.adapters.images.spool), which the worker
decodes from as it reads: the upload's bytes never cross the pipe, only the variants come back.
The child renders `concurrent` uploads at once (two overlap one's decode with the
other's encodes), each upload's twelve encodes and placeholder on `ENCODE_THREADS` threads.
libvips inside is bounded: one thread per pipeline (`concurrency_set(1)`), no operation cache
(uploads never repeat an operation; the cache would only keep decoded pixels alive), and
glibc keeps two malloc arenas and returns freed memory after each upload (flat RSS).

A crash of the worker (a decoder bug hit by a hostile file) fails the uploads in flight with
`ImagesBusy` (503, retry) and the next upload starts a fresh worker; the node keeps serving.

Admission: at most `concurrent + queue_limit` uploads are in progress on a node (streaming
their body, waiting or rendering). `admit()` beyond that raises `ImagesBusy`, which the
handler turns into 503 with `Retry-After` before the body is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import pickle
import struct
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, TypeVar

import pyvips

from server.adapters.images.intake import ImageProbe, Source
from server.adapters.images.pipeline import Encoding, Rendition, render
from server.common.errors import DomainError
from server.common.logs import get_logger

__all__ = ["ImageWorkers", "ImagesBusy", "Slot", "configure_libvips"]

T = TypeVar("T")
PROCESS_NICE = 10  # when autogroups are off: weight ~1/10 of the node under contention
GROUP_NICE = 19  # the worker's autogroup: it gets the CPU other groups leave idle
ENCODE_THREADS = 2  # threads for one upload's encodes (two cores for a lone upload)
MALLOC_ARENAS = 2  # glibc malloc arenas in the worker (default: 8 per core)
_M_ARENA_MAX = -8  # mallopt parameter number, from glibc's malloc.h
BUSY_RETRY_AFTER_S = 2
STOP_TIMEOUT_S = 3.0
_FRAME = struct.Struct(">I")
_log = get_logger("finalmarket.images")

# The child's first statements run before any import of ours: lower the priority, then boot.
_BOOT = (
    "import os\n"
    "try:\n"
    f"    open('/proc/self/autogroup', 'w').write('{GROUP_NICE}')\n"
    "except OSError:\n"
    "    pass\n"
    f"os.nice({PROCESS_NICE})\n"
    "from server.adapters.images.workers import worker_main\n"
    "worker_main()\n"
)
_BOOT_NORMAL_PRIORITY = "from server.adapters.images.workers import worker_main\nworker_main()\n"


class ImagesBusy(DomainError):
    """No room for another upload now (queue full, or the worker restarted); retry later."""

    kind = "images-busy"

    def __init__(self, detail: str, retry_after_s: int = BUSY_RETRY_AFTER_S) -> None:
        super().__init__(detail, retry_after_s=retry_after_s)
        self.retry_after_s = retry_after_s


def configure_libvips() -> None:
    """Process-wide libvips settings for handling uploads (idempotent)."""
    pyvips.block_untrusted_set(True)  # refuse ImageMagick, PDF, SVG... loaders if present
    pyvips.cache_set_max(0)
    pyvips.cache_set_max_mem(0)
    pyvips.cache_set_max_files(0)
    pyvips.concurrency_set(1)


# --- inside the worker process ------------------------------------------------------------------


def render_job(source: Source, probe: ImageProbe, encoding: Encoding) -> Rendition:
    """The job an upload is: runs in the worker process (see `worker_main`)."""
    assert _encode_threads is not None, "runs in the worker process only"
    return render(source, probe, encoding, _encode_threads)


# The worker process's encode threads, set once by `worker_main` (never in the node).
_encode_threads: ThreadPoolExecutor | None = None


def worker_main() -> None:
    """The worker process: jobs in on stdin, results out on stdout, until stdin closes."""
    global _encode_threads
    # The protocol owns the original stdout; anything else printed goes to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    configure_libvips()
    libc = _glibc()
    if libc is not None:
        # Each thread would otherwise get malloc arenas of its own that keep freed pixel
        # buffers: RSS then creeps up with every upload.
        libc.mallopt(_M_ARENA_MAX, MALLOC_ARENAS)
    _encode_threads = ThreadPoolExecutor(ENCODE_THREADS, thread_name_prefix="fm-encode")
    concurrent = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    jobs = ThreadPoolExecutor(concurrent, thread_name_prefix="fm-upload")
    write_lock = threading.Lock()
    stdin = sys.stdin.buffer
    while (job := _read_frame(stdin)) is not None:
        jobs.submit(_run_job, job, out, write_lock, libc)
    jobs.shutdown(wait=True)


def _run_job(job: bytes, out: BinaryIO, write_lock: threading.Lock, libc: Any) -> None:
    job_id, function, args = pickle.loads(job)
    try:
        reply = pickle.dumps((job_id, True, function(*args)), protocol=5)
    except BaseException as exc:  # every failure travels back to the node
        try:
            reply = pickle.dumps((job_id, False, exc), protocol=5)
        except Exception:
            reply = pickle.dumps((job_id, False, RuntimeError(repr(exc))), protocol=5)
    finally:
        if libc is not None:
            libc.malloc_trim(0)  # give the upload's buffers back to the system
    with write_lock:
        out.write(_FRAME.pack(len(reply)) + reply)
        out.flush()


def _read_frame(stream: BinaryIO) -> bytes | None:
    header = stream.read(_FRAME.size)
    if len(header) < _FRAME.size:
        return None
    (length,) = _FRAME.unpack(header)
    payload = stream.read(length)
    return payload if len(payload) == length else None


def _glibc() -> Any:
    """The C library if it is glibc (`mallopt` and `malloc_trim` are glibc's), else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt, libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


# --- in the node --------------------------------------------------------------------------------


class Slot:
    """One admitted upload; `release()` (idempotent) gives its place back."""

    __slots__ = ("_owner", "_released")

    def __init__(self, owner: ImageWorkers) -> None:
        self._owner = owner
        self._released = False

    def release(self) -> None:
        """Give the place back (on finish, on error or when the client goes away)."""
        if not self._released:
            self._released = True
            self._owner.admitted -= 1


class _Worker:
    """One running worker process, the jobs it owes, and the task reading its answers."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.reader = asyncio.get_running_loop().create_task(self._read_answers())

    async def _read_answers(self) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        try:
            while True:
                (length,) = _FRAME.unpack(await stdout.readexactly(_FRAME.size))
                job_id, ok, value = pickle.loads(await stdout.readexactly(length))
                future = self.pending.pop(job_id, None)
                if future is None or future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the process ended: the jobs it owed fail below
        finally:
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(
                        ImagesBusy("the image worker stopped unexpectedly and is restarting")
                    )
            self.pending.clear()


class ImageWorkers:
    """The node's image worker process (started on the first upload), and admission."""

    def __init__(self, concurrent: int, queue_limit: int, *, low_priority: bool = True) -> None:
        """`low_priority=False` keeps the worker at the node's priority (benchmarks that
        measure the pipeline rather than the scheduling policy)."""
        if concurrent < 1 or queue_limit < 0:
            raise ValueError("concurrent must be >= 1 and queue_limit >= 0")
        configure_libvips()  # the node reads headers itself (intake), so it uses libvips too
        self.concurrent = concurrent
        self.queue_limit = queue_limit
        self.low_priority = low_priority
        self.admitted = 0  # uploads between admit() and release()
        self.restarts = 0  # worker processes replaced after they died
        self._worker: _Worker | None = None
        self._starting: asyncio.Lock | None = None
        self._next_job = 0

    @property
    def capacity(self) -> int:
        """Uploads in progress at once (rendering or waiting)."""
        return self.concurrent + self.queue_limit

    @property
    def pid(self) -> int | None:
        """The worker process's id while it runs (for memory figures)."""
        worker = self._worker
        return (
            None if worker is None or worker.process.returncode is not None else worker.process.pid
        )

    def admit(self) -> Slot:
        """A place for one upload, or `ImagesBusy` if every place is taken."""
        if self.admitted >= self.capacity:
            raise ImagesBusy(
                f"{self.admitted} uploads are in progress (the most this node takes); "
                f"retry in {BUSY_RETRY_AFTER_S} s"
            )
        self.admitted += 1
        return Slot(self)

    async def render(self, source: Source, probe: ImageProbe, encoding: Encoding) -> Rendition:
        """Every variant and the placeholder of an upload, made in the worker process.

        `source` is best the path of the upload's file (spooled): the worker reads it as it
        decodes, and only the path crosses the pipe; bytes are copied to the worker whole.
        """
        return await self.run(render_job, source, probe, encoding)

    async def run(self, function: Callable[..., T], *args: object) -> T:
        """`function(*args)` in the worker process (both must pickle: a module-level
        function); `ImagesBusy` if the process died meanwhile."""
        worker = await self._running_worker()
        self._next_job += 1
        job_id = self._next_job
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        worker.pending[job_id] = future
        job = pickle.dumps((job_id, function, args), protocol=5)
        stdin = worker.process.stdin
        assert stdin is not None
        try:
            stdin.write(_FRAME.pack(len(job)) + job)
            await stdin.drain()
        except (ConnectionError, RuntimeError):
            worker.pending.pop(job_id, None)
            raise ImagesBusy("the image worker stopped unexpectedly and is restarting") from None
        return await future

    async def _running_worker(self) -> _Worker:
        worker = self._worker
        if worker is not None and worker.process.returncode is None and not worker.reader.done():
            return worker
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            worker = self._worker
            if worker is None or worker.process.returncode is not None or worker.reader.done():
                if worker is not None:
                    self.restarts += 1
                    _log.warning("image_worker_restarted", returncode=worker.process.returncode)
                worker = self._worker = await self._spawn()
        return worker

    async def _spawn(self) -> _Worker:
        boot = _BOOT if self.low_priority else _BOOT_NORMAL_PRIORITY
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            boot,
            str(self.concurrent),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own session: no terminal signals, its own autogroup
        )
        return _Worker(process)

    async def aclose(self) -> None:
        """Stop the worker: it finishes the jobs it has, then exits (killed if it lingers)."""
        worker, self._worker = self._worker, None
        if worker is None:
            return
        process = worker.process
        if process.stdin is not None:
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        await worker.reader
