"""The load balancer in front of the nodes: nginx (`config/nginx.conf`) and HAProxy
(`config/haproxy.cfg`) configurations rendered for a set of upstream nodes.

The files in `config/` are the documented production configurations with a few `{{name}}`
fields (listen address, upstream servers, working directory); this module fills them, so the
configuration `finalmarket cluster` runs is the one ops deploy.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from server.wiring.settings import DEFAULT_CONFIG_DIR

_FIELD = re.compile(r"\{\{(\w+)\}\}")
NGINX_TEMPLATE = "nginx.conf"
HAPROXY_TEMPLATE = "haproxy.cfg"
# Passive health checks: failures within FAIL_TIMEOUT_S that make nginx rest a node that long.
MAX_FAILS = 2
FAIL_TIMEOUT_S = 5
DEBIAN_MIME_TYPES = "/etc/nginx/mime.types"
DEBIAN_PURGE_MODULE = "/usr/lib/nginx/modules/ngx_http_cache_purge_module.so"


@dataclass(frozen=True, slots=True)
class Upstream:
    """One node behind the balancer; `down` keeps it listed but sends it nothing."""

    address: str  # host:port
    down: bool = False


def render(template: str, fields: dict[str, str]) -> str:
    """`template` with every `{{name}}` replaced; a field the template names but `fields`
    lacks is an error (a config with a hole must not reach nginx)."""

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in fields:
            raise KeyError(f"template field {{{{{name}}}}} has no value")
        return fields[name]

    return _FIELD.sub(fill, template)


def _template(name: str, config_dir: Path | None) -> str:
    return ((config_dir or DEFAULT_CONFIG_DIR) / name).read_text()


def nginx_config(
    upstreams: Sequence[Upstream],
    *,
    listen: str,
    directory: Path,
    mime_types: str = DEBIAN_MIME_TYPES,
    purge_module: str = DEBIAN_PURGE_MODULE,
    config_dir: Path | None = None,
) -> str:
    """A complete nginx.conf balancing over `upstreams`, listening on `listen`, with its pid,
    logs, temporary files and cache under `directory`."""
    if not upstreams:
        raise ValueError("nginx needs at least one upstream node")
    servers = "\n        ".join(
        f"server {u.address} max_fails={MAX_FAILS} fail_timeout={FAIL_TIMEOUT_S}s"
        + (" down;" if u.down else ";")
        for u in upstreams
    )
    return render(
        _template(NGINX_TEMPLATE, config_dir),
        {
            "listen": listen,
            "upstream_servers": servers,
            "dir": str(directory),
            "mime_types": mime_types,
            "purge_module": purge_module,
        },
    )


def haproxy_config(
    upstreams: Sequence[Upstream],
    *,
    listen: str,
    directory: Path,
    config_dir: Path | None = None,
) -> str:
    """A complete haproxy.cfg balancing over `upstreams` with /readyz checks."""
    if not upstreams:
        raise ValueError("HAProxy needs at least one upstream node")
    servers = "\n    ".join(
        f"server node{index} {u.address} check" + (" disabled" if u.down else "")
        for index, u in enumerate(upstreams, start=1)
    )
    return render(
        _template(HAPROXY_TEMPLATE, config_dir),
        {"listen": listen, "upstream_servers": servers, "dir": str(directory)},
    )
