"""`finalmarket dev`: everything a developer needs from one command.

Starts the embedded servers (unless `FM_*` settings already point at external ones),
applies migrations, seeds demo products into an empty catalog, and serves one node on
127.0.0.1:8888. Ctrl-C stops the node and then the servers this command started (servers
that were already running are left running).
"""

from __future__ import annotations

import os
import secrets
import shlex
import sys
from pathlib import Path
from typing import Any

from server.adapters.catalog_store import count_products
from server.adapters.db.migrate import migrate_all
from server.adapters.db.pools import Database
from server.common.logs import get_logger
from server.wiring import infra
from server.wiring.node import run_event_loop, run_node
from server.wiring.seed import seed_catalog
from server.wiring.settings import Settings, configure_logging_for, load_settings

_EXTERNAL_KEYS = ("FM_CATALOG_DSN", "FM_SHARDS", "FM_REDIS_URL")
_SECRET_FILE = "secret_key"
_log = get_logger("finalmarket.dev")


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def dev_secret_key(data_dir: Path) -> str:
    """A secret kept in the data directory, made on first use (dev only; never in git).

    Made atomically, so nodes started at once on a fresh directory all read the same secret.
    """
    path = data_dir / _SECRET_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = data_dir / f".{_SECRET_FILE}.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(48))
        try:
            os.link(tmp, path)  # fails if another process made it first: keep theirs
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()


def dev_settings(data_dir: Path) -> dict[str, str]:
    """The `FM_*` settings of the dev topology in `data_dir` (what `infra up` and `dev` made
    there, running or stopped) and its secret key; empty if no topology was made there."""
    servers = infra.settings_of(data_dir)
    if servers is None:
        return {}
    return {**servers, "FM_SECRET_KEY": dev_secret_key(data_dir)}


async def prepare_data(settings: Settings, products: int) -> None:
    """Migrate every database and seed demo products if the catalog is empty."""
    db = await Database.open(settings)
    try:
        for database, names in (await migrate_all(db)).items():
            if names:
                _say(f"migrated {database}: {', '.join(names)}")
        if await count_products(db.catalog.primary) == 0:
            await seed_catalog(db, products)
    finally:
        await db.close()


def uses_external_servers() -> bool:
    """Whether `FM_CATALOG_DSN`, `FM_SHARDS` and `FM_REDIS_URL` all name servers to use."""
    return all(os.environ.get(key) for key in _EXTERNAL_KEYS)


def will_start_servers(data_dir: Path) -> bool:
    """Whether `ensure_servers` would start the embedded servers of `data_dir` (so the caller
    stops them again, even when it is interrupted while they start)."""
    return not uses_external_servers() and not infra.is_up(data_dir)


def ensure_servers(data_dir: Path, *, replicas: bool = False) -> None:
    """Put the servers' settings and a secret key into the environment: the external servers
    when they are configured, else the embedded ones of `data_dir`, started if they are not
    running. Settings already in the environment win."""
    if uses_external_servers():
        _say("using external PostgreSQL and Redis from FM_* settings")
    else:
        for key, value in infra.up(data_dir, replicas=replicas, log=_say).items():
            os.environ.setdefault(key, value)
    os.environ.setdefault("FM_SECRET_KEY", dev_secret_key(data_dir))


def server_env_lines() -> list[str]:
    """The `export FM_...` lines of the servers in use (for the terminal of a dev command)."""
    return infra.env_lines({k: os.environ[k] for k in _EXTERNAL_KEYS})


def run_dev(
    data_dir: Path,
    *,
    port: int,
    products: int,
    replicas: bool = False,
    data_dir_flag: bool = False,
) -> int:
    """Run the quick start; returns the process exit code. `data_dir_flag`: the data directory
    was named on the command line (so the admin command in the banner names it too)."""
    started_infra = False
    try:
        started_infra = will_start_servers(data_dir)
        ensure_servers(data_dir, replicas=replicas)
        overrides: dict[str, Any] = {"port": port}
        if "FM_HOST" not in os.environ:
            overrides["host"] = "127.0.0.1"
        if "FM_DRAIN_DELAY_S" not in os.environ:
            overrides["drain_delay_s"] = 0.0  # nobody balances load in front of `dev`
        if "FM_LOG_FORMAT" not in os.environ:
            overrides["log_format"] = "console"
        settings = load_settings(**overrides)
        configure_logging_for(settings)
        for line in server_env_lines():
            _say(line)

        async def main() -> None:
            await prepare_data(settings, products)
            admin = admin_command(data_dir if data_dir_flag else None)
            await run_node(settings, on_listening=_announce(settings.host, admin))

        run_event_loop(main())
    finally:
        if started_infra:
            infra.down(data_dir, log=_say)
    return 0


def admin_command(data_dir: Path | None) -> str:
    """The `users create --admin` command line for this checkout (and data directory)."""
    argv0 = Path(sys.argv[0]).absolute()
    if argv0.name == "finalmarket":
        program = _shown_path(argv0)
    else:  # python -m server
        program = f"{_shown_path(Path(sys.executable))} -m server"
    where = f" --data-dir {shlex.quote(str(data_dir))}" if data_dir is not None else ""
    return (
        f"{program} users create{where} --email you@example.com --password 'a long passphrase'"
        " --admin"
    )


def _shown_path(path: Path) -> str:
    """`path` relative to the working directory when it lies inside it (`.venv/bin/...`)."""
    path = path.absolute()
    return shlex.quote(os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path))


def _announce(host: str, admin: str) -> Any:
    def on_listening(port: int) -> None:
        _say(f"Final Market is running at http://{host}:{port}/  (Ctrl-C stops it)")
        _say(f"make an admin: {admin}")

    return on_listening
