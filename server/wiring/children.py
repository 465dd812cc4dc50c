"""Child processes a supervisor owns (the cluster's nodes, its nginx or HAProxy).

Each child runs in a process group of its own, so a terminal's Ctrl-C reaches only the
supervisor, which then stops its children in order (nodes drain before the balancer stops).
On Linux each child also gets SIGTERM when the supervisor dies, even by SIGKILL, so no node or
balancer outlives the command that started it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

_PR_SET_PDEATHSIG = 1
# Loaded before any fork: the child may only call into it (no dlopen between fork and exec).
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _own_group_and_parent_death_signal() -> None:
    """Run in the child between fork and exec."""
    os.setpgid(0, 0)
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(argv: Sequence[str], *, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start `argv` as an owned child: its own process group, stdin closed, stdout and stderr
    shared with the supervisor (so its logs reach the terminal)."""
    return subprocess.Popen(
        list(argv),
        env=dict(env) if env is not None else None,
        stdin=subprocess.DEVNULL,
        preexec_fn=_own_group_and_parent_death_signal,
    )


def signal_child(proc: subprocess.Popen[bytes], signum: int) -> None:
    """Send `signum` to `proc` unless it has exited."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)


def wait_or_kill(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """`proc`'s exit code, waiting `timeout` seconds before killing it."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is None:
        signal_child(proc, signal.SIGKILL)
    return proc.wait()
