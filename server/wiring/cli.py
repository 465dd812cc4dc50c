"""The `finalmarket` command: dev, cluster, edge, infra, migrate, seed, serve, users, settings."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from server.adapters.db.migrate import migrate_all
from server.adapters.db.pools import Database
from server.common.logs import configure_logging, get_logger
from server.wiring import infra
from server.wiring.node import run_event_loop, run_node
from server.wiring.settings import (
    Settings,
    SettingsInvalid,
    configure_logging_for,
    load_settings,
    settings_table_markdown,
)

DEFAULT_DATA_DIR = ".fm-data"
DEV_PORT = 8888
DEV_DEMO_PRODUCTS = 500
_log = get_logger("finalmarket.cli")


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _data_dir(value: str | None) -> Path:
    return Path(value or os.environ.get("FM_DATA_DIR") or DEFAULT_DATA_DIR).resolve()


# Without these (from the environment or a config file), a command uses the dev topology.
_SERVER_SETTINGS = frozenset({"FM_CATALOG_DSN", "FM_SHARDS", "FM_REDIS_URL"})


def _settings(data_dir: str | None, **overrides: Any) -> Settings:
    """The node's settings; when no server location is configured at all, those of the dev
    topology in the data directory (made by `infra up` or `dev`), secret key included.
    Settings given in the environment or config files always win."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        settings = load_settings(**given)
    except SettingsInvalid as exc:
        if not _SERVER_SETTINGS.issubset(exc.missing):
            raise
        from server.wiring.dev import dev_settings

        directory = _data_dir(data_dir)
        found = dev_settings(directory)
        if not found:
            raise SettingsInvalid(
                f"{exc}\nno dev servers in {directory} either: run `finalmarket dev` or "
                "`finalmarket infra up` first, or pass --data-dir",
                exc.missing,
            ) from None
        taken = {key: value for key, value in found.items() if key not in os.environ}
        os.environ.update(taken)
        secret = " and secret key" if "FM_SECRET_KEY" in taken else ""
        running = "" if infra.is_up(directory) else " (not running: `finalmarket infra up`)"
        _err(f"finalmarket: using the dev servers{secret} in {directory}{running}")
        settings = load_settings(**given)
    configure_logging_for(settings)
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
    """Start the embedded servers and print their settings (with the data directory's secret
    key) as `export` lines."""
    from server.wiring.dev import dev_secret_key

    data_dir = _data_dir(args.data_dir)
    settings = infra.up(
        data_dir,
        replicas=args.replicas,
        redis_cluster=args.redis_cluster,
        ha=args.ha,
        synchronous_mode=args.synchronous_mode,
        log=_err,
    )
    # Kept in the data directory (so the commands that find this topology by themselves use
    # the same one) and printed, so `serve` with only these variables starts.
    settings["FM_SECRET_KEY"] = dev_secret_key(data_dir)
    print("\n".join(infra.env_lines(settings)))
    return 0


def cmd_infra_down(args: argparse.Namespace) -> int:
    """Stop the embedded servers of a data directory."""
    infra.down(_data_dir(args.data_dir), log=_err)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """Apply pending migrations to the catalog and every shard."""
    settings = _settings(args.data_dir)
    applied = run_async(_with_database(settings, migrate_all))
    for database, names in applied.items():
        _err(f"{database}: {', '.join(names) if names else 'up to date'}")
    return 0


def cmd_seed(args: argparse.Namespace) -> int:
    """Add demo products to the catalog."""
    from server.wiring.seed import seed_catalog

    settings = _settings(args.data_dir)
    added = run_async(_with_database(settings, lambda db: seed_catalog(db, args.products)))
    _err(f"added {added} products")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run one node until SIGTERM/SIGINT."""
    settings = _settings(args.data_dir, port=args.port, node_id=args.node_id, host=args.host)
    run_event_loop(run_node(settings))
    return 0


def cmd_users_create(args: argparse.Namespace) -> int:
    """Create an account (admin with --admin)."""
    from server.domain.users import UserService

    settings = _settings(args.data_dir)

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
        _data_dir(args.data_dir),
        port=args.port,
        products=args.products,
        replicas=args.replicas,
        data_dir_flag=args.data_dir is not None,
    )


def cmd_cluster(args: argparse.Namespace) -> int:
    """Embedded servers (as `dev`), N nodes on the ports after --port, and nginx (or HAProxy)
    on --port in front of them; nodes whose /readyz fails are taken out of the rotation.
    Ctrl-C drains the nodes and stops everything it started. `cluster add-node` and
    `cluster remove-node` scale the cluster running from --data-dir."""
    from server.wiring.cluster import run_cluster, scale

    if args.action is not None:
        _err(scale(_data_dir(args.data_dir), args.action))
        return 0
    return run_cluster(
        _data_dir(args.data_dir),
        nodes=args.nodes,
        port=args.port,
        products=args.products,
        balancer_name=args.balancer,
        data_dir_flag=args.data_dir is not None,
    )


def cmd_edge(args: argparse.Namespace) -> int:
    """Print the load balancer's configuration (config/nginx.conf or config/haproxy.cfg) for
    the given nodes."""
    from server.wiring.edge import Upstream, haproxy_config, nginx_config

    upstreams = [Upstream(address) for address in args.upstream]
    directory = Path(args.dir).resolve()
    render = nginx_config if args.edge_command == "nginx" else haproxy_config
    sys.stdout.write(render(upstreams, listen=args.listen, directory=directory))
    return 0


def host_port(value: str) -> str:
    """An argparse type: `HOST:PORT` (`[v6]:PORT` too) with a port between 1 and 65535."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return value


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a one-shot command's coroutine on the same loop flavour as the server."""
    result: list[Any] = []

    async def capture() -> None:
        result.append(await coro)

    run_event_loop(capture())
    return result[0]


# --- parser -----------------------------------------------------------------------------------


DATA_DIR_HELP = (
    f"data directory of the embedded servers (default: $FM_DATA_DIR or ./{DEFAULT_DATA_DIR})"
)
FOUND_HELP = (
    "; its servers and secret key are used when FM_CATALOG_DSN, FM_SHARDS and FM_REDIS_URL "
    "are not set"
)


def _command(
    sub: Any, name: str, summary: str, func: Callable[[argparse.Namespace], int] | None = None
) -> argparse.ArgumentParser:
    """A subcommand whose `-h` shows `func`'s docstring (or `summary`) as its description."""
    description = (
        func.__doc__ if func is not None else None
    ) or f"{summary[0].upper()}{summary[1:]}."
    parser: argparse.ArgumentParser = sub.add_parser(name, help=summary, description=description)
    if func is not None:
        parser.set_defaults(func=func)
    return parser


def _data_dir_option(parser: argparse.ArgumentParser, found: bool = False) -> None:
    parser.add_argument(
        "--data-dir", metavar="DIR", help=DATA_DIR_HELP + (FOUND_HELP if found else "")
    )


def build_parser() -> argparse.ArgumentParser:
    """The command-line grammar of `finalmarket`."""
    from server.domain.users import MIN_PASSWORD_CHARS

    parser = argparse.ArgumentParser(prog="finalmarket", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dev = _command(sub, "dev", "embedded servers, migrations, demo data, one node", cmd_dev)
    _data_dir_option(dev)
    dev.add_argument(
        "--port", type=int, default=DEV_PORT, help="TCP port of the node (%(default)s)"
    )
    dev.add_argument(
        "--products",
        type=int,
        default=DEV_DEMO_PRODUCTS,
        help="demo products seeded into an empty catalog (%(default)s)",
    )
    dev.add_argument("--replicas", action="store_true", help="a streaming replica per database")

    from server.wiring.balancer import BALANCERS
    from server.wiring.cluster import CLUSTER_PORT

    cluster = _command(
        sub, "cluster", "embedded servers, N nodes and a load balancer in front", cmd_cluster
    )
    cluster.add_argument(
        "action",
        nargs="?",
        choices=("add-node", "remove-node"),
        help="scale the cluster running from --data-dir: start one more node (in the "
        "rotation once ready), or take the newest out of the rotation and drain it",
    )
    cluster.add_argument("--nodes", type=int, default=2, help="how many nodes to run (%(default)s)")
    cluster.add_argument(
        "--port",
        type=int,
        default=CLUSTER_PORT,
        help="port of the balancer (%(default)s); the nodes take the next N ports",
    )
    cluster.add_argument(
        "--products",
        type=int,
        default=DEV_DEMO_PRODUCTS,
        help="demo products seeded into an empty catalog (%(default)s)",
    )
    cluster.add_argument(
        "--balancer",
        choices=BALANCERS,
        default="nginx",
        help="nginx (caching edge, the supervisor checks /readyz) or haproxy (checks it itself)",
    )
    _data_dir_option(cluster)

    edge = _command(sub, "edge", "print a load balancer configuration for given nodes")
    edge_sub = edge.add_subparsers(dest="edge_command", required=True, metavar="BALANCER")
    for name, summary in (
        ("nginx", "nginx.conf: balancer, WebSocket proxy and caching edge"),
        ("haproxy", "haproxy.cfg: balancer with /readyz checks"),
    ):
        balancer = _command(edge_sub, name, summary, cmd_edge)
        balancer.add_argument(
            "--upstream",
            action="append",
            required=True,
            type=host_port,
            metavar="HOST:PORT",
            help="a node to balance over (repeat for each node)",
        )
        balancer.add_argument(
            "--listen",
            type=host_port,
            default="0.0.0.0:80",
            metavar="ADDR:PORT",
            help="address the balancer listens on (%(default)s)",
        )
        balancer.add_argument(
            "--dir",
            required=True,
            metavar="DIR",
            help="directory of the balancer's pid, logs, temporary files and cache",
        )

    infra_cmd = _command(
        sub, "infra", "embedded PostgreSQL and Redis (Valkey) in the background, for dev and tests"
    )
    infra_sub = infra_cmd.add_subparsers(dest="infra_command", required=True, metavar="COMMAND")
    up = _command(infra_sub, "up", "start them and print their FM_ settings", cmd_infra_up)
    _data_dir_option(up)
    up.add_argument(
        "--replicas",
        action="store_true",
        help="catalog and each shard on their own primary with a streaming replica",
    )
    up.add_argument(
        "--redis-cluster",
        action="store_true",
        help="a Valkey cluster of 3 masters and 3 replicas instead of one Valkey",
    )
    up.add_argument(
        "--ha",
        action="store_true",
        help="catalog and each shard as a two-member Patroni cluster over a local etcd "
        "(automatic failover; needs Debian's etcd-server)",
    )
    up.add_argument(
        "--synchronous-mode",
        action="store_true",
        help="with --ha: Patroni's synchronous_mode (a failover loses no acknowledged commit; "
        "writes wait for the replica). Fixed at the first `up`",
    )
    down = _command(infra_sub, "down", "stop them (their data is kept)", cmd_infra_down)
    _data_dir_option(down)

    migrate = _command(sub, "migrate", "apply migrations everywhere", cmd_migrate)
    _data_dir_option(migrate, found=True)

    seed = _command(sub, "seed", "add demo products", cmd_seed)
    seed.add_argument(
        "--products",
        type=int,
        default=DEV_DEMO_PRODUCTS,
        help="how many products to add (%(default)s)",
    )
    _data_dir_option(seed, found=True)

    serve = _command(sub, "serve", "run one node", cmd_serve)
    serve.add_argument("--port", type=int, help="TCP port to listen on (overrides FM_PORT)")
    serve.add_argument("--host", help="address to listen on, e.g. 0.0.0.0 (overrides FM_HOST)")
    serve.add_argument(
        "--node-id",
        metavar="ID",
        help="name of the node in logs, metrics and broker messages (overrides FM_NODE_ID)",
    )
    _data_dir_option(serve, found=True)

    users = _command(sub, "users", "manage accounts")
    users_sub = users.add_subparsers(dest="users_command", required=True, metavar="COMMAND")
    create = _command(users_sub, "create", "create an account", cmd_users_create)
    create.add_argument("--email", required=True, help="sign-in address (stored lower-cased)")
    create.add_argument(
        "--password", required=True, help=f"its password (at least {MIN_PASSWORD_CHARS} characters)"
    )
    create.add_argument("--name", default="", help="display name (default: none)")
    create.add_argument("--admin", action="store_true", help="may manage products and stock")
    _data_dir_option(create, found=True)

    _command(sub, "settings", "print the settings table", cmd_settings)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `finalmarket` console script."""
    args = build_parser().parse_args(argv)
    if args.command not in ("serve", "dev", "cluster"):
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
