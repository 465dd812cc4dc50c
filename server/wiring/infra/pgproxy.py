"""HAProxy in front of the Patroni clusters of an ``infra up --ha`` topology.

``config/haproxy-postgres.cfg`` is the documented configuration (one write and one read
listener per cluster, checking Patroni's REST API); this module fills its fields for the
embedded topology and rewrites FM_* settings to go through it, so the file that is tested is
the one ops deploy.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from server.wiring.edge import render
from server.wiring.infra.common import InfraError
from server.wiring.infra.topology import CATALOG_DB, SHARD_COUNT, ha_members, shard_db
from server.wiring.settings import DEFAULT_CONFIG_DIR

TEMPLATE = "haproxy-postgres.cfg"
GROUPS = ("catalog", *(f"shard{i}" for i in range(SHARD_COUNT)))


def _database(group: str) -> str:
    return CATALOG_DB if group == "catalog" else shard_db(int(group.removeprefix("shard")))


def haproxy_postgres_config(
    data_dir: Path,
    *,
    listen: Mapping[str, tuple[int, int]],
    directory: Path,
    config_dir: Path | None = None,
) -> str:
    """``config/haproxy-postgres.cfg`` for the HA topology in ``data_dir``: ``listen`` maps
    each group ("catalog", "shard0", ...) to its (write, read) port on 127.0.0.1; the pid
    file goes to ``directory``."""
    members = ha_members(data_dir)
    missing = set(GROUPS) - set(listen)
    if missing:
        raise InfraError(f"no HAProxy listen ports for {', '.join(sorted(missing))}")
    fields = {"dir": str(directory)}
    for group in GROUPS:
        write, read = listen[group]
        fields[f"{group}_write"] = f"127.0.0.1:{write}"
        fields[f"{group}_read"] = f"127.0.0.1:{read}"
        for letter, member in zip("ab", members[group], strict=True):
            fields[f"{group}_{letter}"] = f"127.0.0.1:{member.spec.pg_port}"
            fields[f"{group}_{letter}_api"] = str(member.spec.api_port)
    return render(((config_dir or DEFAULT_CONFIG_DIR) / TEMPLATE).read_text(), fields)


def settings_through_haproxy(
    settings: Mapping[str, str], listen: Mapping[str, tuple[int, int]]
) -> dict[str, str]:
    """``settings`` (of an HA topology) with each database's primary DSN naming its HAProxy
    write listener and its replica DSN the read listener (single hosts: HAProxy finds the
    primary, so no target_session_attrs)."""

    def dsn(group: str, read: bool) -> str:
        return f"postgresql://postgres@127.0.0.1:{listen[group][int(read)]}/{_database(group)}"

    routed = dict(settings)
    routed["FM_CATALOG_DSN"] = dsn("catalog", read=False)
    routed["FM_CATALOG_REPLICA_DSN"] = dsn("catalog", read=True)
    shards = [
        {"primary": dsn(f"shard{i}", read=False), "replica": dsn(f"shard{i}", read=True)}
        for i in range(SHARD_COUNT)
    ]
    routed["FM_SHARDS"] = json.dumps(shards, separators=(",", ":"))
    return routed
