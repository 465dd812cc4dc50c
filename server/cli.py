"""The `finalmarket` command: dev, infra, migrate, seed, serve, users, settings."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from server.wiring import infra
from server.adapters.db.migrate import migrate_all
from server.adapters.db.pools import Database
from server.common.logs import configure_logging, get_logger
from server.wiring.node import run_event_loop, run_node
from server.wiring.settings import Settings, SettingsInvalid, load_settings, settings_table_markdown

DEFAULT_DATA_DIR = ".fm-data"
DEV_PORT = 8888
DEV_DEMO_PRODUCTS = 500
_log = get_logger("finalmarket.cli")


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _data_dir(value: str | None) -> Path:
    return Path(value or os.environ.get("FM_DATA_DIR") or DEFAULT_DATA_DIR).resolve()


def _settings(**overrides: Any) -> Settings:
    settings = load_settings(**{k: v for k, v in overrides.items() if v is not None})
    configure_logging(settings.log_level, settings.log_format, settings.node_id)
    return settings


async def _with_database(
    settings: Settings, work: Callable[[Database], Coroutine[Any, Any, Any]]
) -> Any:
    db = await Database.open(settings)
    try:
        return await work(db)
    finally:
        await db.close()


# --- commands ---------------------------------------------------------------------------------


def cmd_infra_up(args: argparse.Namespace) -> int:
    """Start the embedded servers and print their settings as `export` lines."""
    settings = infra.up(
        _data_dir(args.data_dir), replicas=args.replicas, redis_cluster=args.redis_cluster, log=_err
    )
    print("\n".join(infra.env_lines(settings)))
    return 0


def cmd_infra_down(args: argparse.Namespace) -> int:
    """Stop the embedded servers of a data directory."""
    infra.down(_data_dir(args.data_dir), log=_err)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """Apply pending migrations to the catalog and every shard."""
    settings = _settings()
    applied = run_async(_with_database(settings, migrate_all))
    for database, names in applied.items():
        _err(f"{database}: {', '.join(names) if names else 'up to date'}")
    return 0


def cmd_seed(args: argparse.Namespace) -> int:
    """Add demo products to the catalog."""
    from server.wiring.seed import seed_catalog

    settings = _settings()
    added = run_async(_with_database(settings, lambda db: seed_catalog(db, args.products)))
    _err(f"added {added} products")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run one node until SIGTERM/SIGINT."""
    settings = _settings(port=args.port, node_id=args.node_id, host=args.host)
    run_event_loop(run_node(settings))
    return 0


def cmd_users_create(args: argparse.Namespace) -> int:
    """Create an account (admin with --admin)."""
    from server.domain.users import UserService

    settings = _settings()

    async def create(db: Database) -> Any:
        from server.adapters.db.router import ShardRouter

        router = ShardRouter.for_settings(db, settings)
        try:
            return await UserService(router).create_user(
                args.email, args.password, args.name, args.admin
            )
        finally:
            await router.close()

    user = run_async(_with_database(settings, create))
    print(f"created user {user.id} <{user.email}>{' (admin)' if user.is_admin else ''}")
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    """Print the documented settings table (the README's copy is generated from it)."""
    print(settings_table_markdown())
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    """Embedded servers + migrations + demo data (once) + one node on 127.0.0.1:8888."""
    from server.wiring.dev import run_dev

    return run_dev(
        _data_dir(args.data_dir), port=args.port, products=args.products, replicas=args.replicas
    )


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a one-shot command's coroutine on the same loop flavour as the server."""
    result: list[Any] = []

    async def capture() -> None:
        result.append(await coro)

    run_event_loop(capture())
    return result[0]


# --- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command-line grammar of `finalmarket`."""
    parser = argparse.ArgumentParser(prog="finalmarket", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="embedded servers, migrations, demo data, one node")
    dev.add_argument(
        "--data-dir", help=f"where the embedded servers keep data ({DEFAULT_DATA_DIR})"
    )
    dev.add_argument("--port", type=int, default=DEV_PORT)
    dev.add_argument(
        "--products", type=int, default=DEV_DEMO_PRODUCTS, help="demo products on first run"
    )
    dev.add_argument("--replicas", action="store_true", help="a streaming replica per database")
    dev.set_defaults(func=cmd_dev)

    infra_cmd = sub.add_parser("infra", help="embedded PostgreSQL and Redis")
    infra_sub = infra_cmd.add_subparsers(dest="infra_command", required=True)
    up = infra_sub.add_parser("up", help="start them and print FM_ settings")
    up.add_argument("--data-dir")
    up.add_argument("--replicas", action="store_true")
    up.add_argument("--redis-cluster", action="store_true")
    up.set_defaults(func=cmd_infra_up)
    down = infra_sub.add_parser("down", help="stop them")
    down.add_argument("--data-dir")
    down.set_defaults(func=cmd_infra_down)

    sub.add_parser("migrate", help="apply migrations everywhere").set_defaults(func=cmd_migrate)

    seed = sub.add_parser("seed", help="add demo products")
    seed.add_argument("--products", type=int, default=DEV_DEMO_PRODUCTS)
    seed.set_defaults(func=cmd_seed)

    serve = sub.add_parser("serve", help="run one node")
    serve.add_argument("--port", type=int)
    serve.add_argument("--node-id")
    serve.add_argument("--host")
    serve.set_defaults(func=cmd_serve)

    users = sub.add_parser("users", help="manage accounts")
    users_sub = users.add_subparsers(dest="users_command", required=True)
    create = users_sub.add_parser("create", help="create an account")
    create.add_argument("--email", required=True)
    create.add_argument("--password", required=True)
    create.add_argument("--name", default="")
    create.add_argument("--admin", action="store_true")
    create.set_defaults(func=cmd_users_create)

    sub.add_parser("settings", help="print the settings table").set_defaults(func=cmd_settings)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `finalmarket` console script."""
    args = build_parser().parse_args(argv)
    if args.command not in ("serve", "dev"):
        configure_logging("warning", "console")
    try:
        return int(args.func(args))
    except SettingsInvalid as exc:
        for line in str(exc).splitlines():
            _err(f"finalmarket: configuration error: {line}")
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from server.common.errors import DomainError

        if isinstance(exc, DomainError | infra.InfraError):
            _err(f"finalmarket: {exc}")
            return 1
        raise
