"""`finalmarket dev`: everything a developer needs from one command.

Starts the embedded servers (unless `FM_*` settings already point at external ones),
applies migrations, seeds demo products into an empty catalog, and serves one node on
127.0.0.1:8888. Ctrl-C stops the node and then the servers this command started (servers
that were already running are left running).
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from typing import Any

from server.wiring import infra
from server.adapters.catalog_store import count_products
from server.adapters.db.migrate import migrate_all
from server.adapters.db.pools import Database
from server.common.logs import configure_logging, get_logger
from server.wiring.node import run_event_loop, run_node
from server.wiring.seed import seed_catalog
from server.wiring.settings import Settings, load_settings

_EXTERNAL_KEYS = ("FM_CATALOG_DSN", "FM_SHARDS", "FM_REDIS_URL")
_SECRET_FILE = "secret_key"
_log = get_logger("finalmarket.dev")


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def dev_secret_key(data_dir: Path) -> str:
    """A secret kept in the data directory, made on first use (dev only; never in git)."""
    path = data_dir / _SECRET_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(48))
        path.chmod(0o600)
    return path.read_text().strip()


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


def run_dev(data_dir: Path, *, port: int, products: int, replicas: bool = False) -> int:
    """Run the quick start; returns the process exit code."""
    external = all(os.environ.get(key) for key in _EXTERNAL_KEYS)
    started_infra = False
    try:
        if external:
            _say("using external PostgreSQL and Redis from FM_* settings")
        else:
            started_infra = not infra.is_up(data_dir)
            for key, value in infra.up(data_dir, replicas=replicas, log=_say).items():
                os.environ.setdefault(key, value)
        os.environ.setdefault("FM_SECRET_KEY", dev_secret_key(data_dir))
        overrides: dict[str, Any] = {"port": port}
        if "FM_HOST" not in os.environ:
            overrides["host"] = "127.0.0.1"
        if "FM_DRAIN_DELAY_S" not in os.environ:
            overrides["drain_delay_s"] = 0.0  # nobody balances load in front of `dev`
        if "FM_LOG_FORMAT" not in os.environ:
            overrides["log_format"] = "console"
        settings = load_settings(**overrides)
        configure_logging(settings.log_level, settings.log_format, settings.node_id)
        for line in infra.env_lines({k: os.environ[k] for k in _EXTERNAL_KEYS}):
            _say(line)

        async def main() -> None:
            await prepare_data(settings, products)
            await run_node(settings, on_listening=_announce(settings.host))

        run_event_loop(main())
    finally:
        if started_infra:
            infra.down(data_dir, log=_say)
    return 0


def _announce(host: str) -> Any:
    def on_listening(port: int) -> None:
        _say(f"Final Market is running at http://{host}:{port}/  (Ctrl-C stops it)")

    return on_listening
