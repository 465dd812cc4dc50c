"""GraphQL over real HTTP, and SQL statements per query with and without DataLoaders.

Used by `scripts/bench/graphql` (sections "http" and "statements"); `python
scripts/bench/graphql_http.py [--duration 3] [--rounds 1]` runs both on a deployment of its
own, for trying.

**HTTP** (`measure_http`): queries/s, p50/p99 and the server's CPU per query (utime + stime of
the `finalmarket serve` process, or of the peer's uvicorn process, from `/proc`, as
`scripts/bench/rest` reads it; Valkey's and PostgreSQL's CPU are not counted) for two
documents sent as anonymous GETs (the query and the variables URL-encoded in the query string)
by `wrk -t1 -c64 -dDs --latency`, to one node and to its peer in the same run:

* the product page: `product(id: $id)` with a hot id, description, stock, updatedAt and its
  images (`placeholder`, `src { small large }`);
* `products(first: 50)` with cursor, stock and 3 images per product (`src { small medium
  large }`), and pageInfo;

each **cached** (the node's defaults: the result cache answers; results showing stock live at
most 1 s, so about one execution per second per document remains) and **uncached** (the node
restarted with `FM_GRAPHQL_RESULT_CACHE_TTL_S=0`, which `ResultCache.enabled` reads as "no
result cache": every request executes; the catalog's own product, list and stock caches stay
on, as they would in production). The GraphQL cost bucket is raised out of the way (`wrk`
comes from one address; the charge and refund still run on every request), as the REST rate
limits are by `benchlib.Deployment.start_node`. The node's `fm_graphql_executed_operations`
counter is read around each of its runs, so the table shows executions per query (about 0
cached, 1 uncached).

**The peer** (`graphql_ariadne_peer.py`, see its docstring): Ariadne, loading the very same SDL
files, on uvicorn (`--loop uvloop --http httptools --workers 1`, access log on) at its defaults
but `execute_get_queries=True` (without it a GET gets Ariadne's explorer page), in the REST
peer's cache virtualenv (`scripts/bench/rest`'s `ensure_peer_venv`, which installs ariadne
too); it imports nothing from Final Market. Its resolvers read the same Redis entries the node
wrote (the product entry, the list page entry; images are in them) with the same versioned-read
script, and stock from PostgreSQL with the same 1 s bound, through `rest_fastapi_peer.Peer`.
Cached = `PEER_GRAPHQL_MODE=cached`: a whole-result cache in Redis keyed by SHA-256 of (query,
operationName, variables) with the node's TTL policy at its defaults (60 s, 1 s for results
selecting stock, stored under the catalog's `product_list` version so bumps invalidate it as
they invalidate the node's); uncached = every request executed. The peer only reads Final
Market's entries (a missing one answers 503), so before each peer run the harness renews, through
the node, any entry that would expire during the run (a list page lives 60 s).

Before measuring, each document is checked on the node to answer 200 without errors, with the
expected shape and `Cache-Control: public`; the peer's `data` must equal the node's (in cached
mode both its first answer, executed, and its second, from its cache), and the cached and
uncached nodes' `data` must be equal. Then, per document and mode, both servers warm up and
take turns for `--rounds` runs (each round and document starting with the other server, so
drifting load on a shared machine falls on both); the run with the median queries/s of each is
reported with the ratios ours / peer (q/s, p99) and whether the goal (>= 1.5x the peer's q/s
at a p99 no worse) is met.

What is fair and what is not: both serve the same schema, documents and bytes of data from the
same Redis and PostgreSQL, one process each on the same machine, logging at their defaults, the
peer's stock and result caches bounded as the node's. The node does more per request (cost and
depth analysis, the cost bucket's charge and refund, `extensions.cost`, `Cache-Control`); the
peer does less in that respect but, at Ariadne's defaults, parses and validates every request
(validation is most of its time for the product page: about three quarters, measured
in-process), reads Redis once per entry per request (the node has a local layer of at most 1 s
in front of Redis and keeps decoded product dicts) and decodes the product JSON every time;
those are the implementations' own choices and part of what is compared. The peer's
single-flight of result-cache misses is per process (the node's is across nodes, which one node
cannot show).

**Statements** (`measure_statements`): SQL statements run per query, counted at the pool (the
router's `read_statements` and `writes`, all databases), for `products(first: 5)` and
`products(first: 50)` each selecting `stock` and `images`, executed in this process through the
node's own `Executor` (`parse`, `prepare`, `execute`) with a `RequestContext`, as the HTTP
pipeline runs it (minus cost, throttle and result cache, which run no SQL). Once with the real
DataLoaders and once "without DataLoaders": `BatchLoader` replaced, in this process only, by a
loader that dispatches each key on its own as soon as it is asked for (so an N+1 shows up as N
statements, measured rather than computed). Two cache states:

* **cold**: Redis flushed (FLUSHDB), the node's local cache layer dropped, live stock
  forgotten: the list page is read from PostgreSQL;
* **list cached, stock expired**: the list page is in the cache (Redis and the local layer)
  but the stock counts are older than their 1 s freshness bound, which is the steady state of
  a hot list page (its entry lives 60 s, its stock 1 s).

Test data: `seed --products N`, then 3 `product_images` rows per product inserted with SQL
(plausible `src`/`variants` URLs in the shape the image service writes, a ~200-character WebP
data-URL placeholder, 1600x1200).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.bench.benchlib import (  # noqa: E402
    Deployment,
    free_port,
    machine,
    progress,
    start_server,
    stop_process,
)
from server.adapters.cache import NS_PRODUCT, NS_PRODUCT_LIST  # noqa: E402

VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
PEER_APP = Path(__file__).resolve().parent / "graphql_ariadne_peer.py"
# uvicorn as the REST peer runs (access log on: its default).
PEER_UVICORN_OPTIONS = ["--loop", "uvloop", "--http", "httptools", "--workers", "1"]
PEER_READY_TIMEOUT_S = 60.0

PRODUCT_QUERY = (
    "query($id: ID!) { product(id: $id) { id name description priceCents currency stock "
    "updatedAt images { id placeholder src { small large } } } }"
)
LIST_QUERY = (
    "{ products(first: 50) { edges { cursor node { id name priceCents stock "
    "images { id src { small medium large } } } } pageInfo { hasNextPage endCursor } } }"
)
LIST_FIRST = 50
# `products(first: N)` selecting stock and images (the list document's selection).
STATEMENTS_QUERY = (
    "query($first: Int) { products(first: $first) { edges { cursor node { id name priceCents "
    "stock images { id src { small medium large } } } } pageInfo { hasNextPage endCursor } } }"
)
STATEMENT_FIRSTS = (5, 50)
IMAGES_PER_PRODUCT = 3
IMAGE_SIZES = ("thumbnail", "small", "medium", "large")
IMAGE_FORMATS = {"jpeg": "jpg", "webp": "webp", "avif": "avif"}

# The cost bucket out of wrk's way (one address sends everything); still charged per request.
THROTTLE_ENV = {
    "FM_GRAPHQL_THROTTLE_MAXIMUM": "1000000000",
    "FM_GRAPHQL_THROTTLE_RESTORE_PER_SECOND": "1000000000",
}
MODES: dict[str, dict[str, str]] = {
    "cached": {},
    "uncached": {"FM_GRAPHQL_RESULT_CACHE_TTL_S": "0"},
}
EXECUTED_METRIC = "fm_graphql_executed_operations_total"


# --- options --------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options `measure_http` reads (all optional: `measure_http` has the same defaults)."""
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run (10)")
    parser.add_argument("--warmup", type=int, default=3, help="seconds of wrk warm-up (3)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="wrk runs per server, document and mode, node and peer taking turns; medians (3)",
    )
    parser.add_argument("--connections", type=int, default=64, help="wrk -c (64)")
    parser.add_argument("--threads", type=int, default=1, help="wrk -t (1)")
    parser.add_argument("--products", type=int, default=1000, help="products seeded (1000)")
    parser.add_argument("--product-id", type=int, default=42, help="the hot product (42)")
    parser.add_argument("--pool-max-size", type=int, default=10, help="node's pools (10)")
    parser.add_argument(
        "--python",
        default=str(VENV_PYTHON if VENV_PYTHON.exists() else sys.executable),
        help="interpreter that runs `-m server` (default: the project's venv)",
    )


_DEFAULTS = {
    "duration": 10,
    "warmup": 3,
    "rounds": 3,
    "connections": 64,
    "threads": 1,
    "products": 1000,
    "product_id": 42,
    "pool_max_size": 10,
    "python": str(VENV_PYTHON if VENV_PYTHON.exists() else sys.executable),
}


def _options(args: Any) -> argparse.Namespace:
    """`args` with every option `measure_http` reads (defaults for the missing ones)."""
    return argparse.Namespace(**{k: getattr(args, k, v) for k, v in _DEFAULTS.items()})


# --- wrk and /proc: scripts/bench/rest's own functions --------------------------------------


def _rest_module() -> ModuleType:
    """`scripts/bench/rest` (a script without `.py`) imported as a module, for its `wrk_run`
    (wrk, `parse_wrk`, CPU per request from /proc). Importing it runs only definitions."""
    name = "finalmarket_bench_rest"
    module = sys.modules.get(name)
    if module is None:
        path = Path(__file__).resolve().parent / "rest"
        loader = importlib.machinery.SourceFileLoader(name, str(path))
        spec = importlib.util.spec_from_loader(name, loader)
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        loader.exec_module(module)
    return module


# --- test data ------------------------------------------------------------------------------


def _image_row(product_id: int, index: int) -> tuple[Any, ...]:
    """One `product_images` row (without product_id) shaped like the image service's."""
    content_hash = hashlib.blake2b(f"bench-{product_id}-{index}".encode(), digest_size=20)
    digest = content_hash.hexdigest()
    key = hashlib.blake2b(digest.encode(), digest_size=20).hexdigest()
    rng = random.Random(f"{product_id}-{index}")
    placeholder = "data:image/webp;base64," + base64.b64encode(rng.randbytes(130)).decode()
    variants: dict[str, dict[str, str]] = {}
    for size in IMAGE_SIZES:
        variants[size] = {}
        for fmt, extension in IMAGE_FORMATS.items():
            name = hashlib.blake2b(f"{key}-{size}-{fmt}".encode(), digest_size=20).hexdigest()
            variants[size][fmt] = f"/images/{name[:2]}/{name}.{extension}"
    src = {size: f"/images/{key}/{size}" for size in IMAGE_SIZES}
    return (digest, placeholder, json.dumps(variants), json.dumps(src), 1600, 1200, index)


def prepare_data(deploy: Deployment, products: int) -> dict[str, int]:
    """At least `products` products (seeded), each with `IMAGES_PER_PRODUCT` images (inserted
    with SQL); Redis flushed afterwards so no cached entry predates the images. Idempotent.
    Call before a node starts (a running node's local cache would not see the images)."""
    import psycopg2
    from psycopg2.extras import execute_values

    dsn = deploy.env["FM_CATALOG_DSN"]
    with contextlib.closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM products")
        present = int(cur.fetchone()[0])
    if present < products:
        progress(f"seed --products {products - present}")
        deploy.run_cli("seed", "--products", str(products - present))
    with contextlib.closing(psycopg2.connect(dsn)) as conn, conn, conn.cursor() as cur:
        cur.execute(
            "SELECT p.id, count(im.id) FROM products p"
            " LEFT JOIN product_images im ON im.product_id = p.id GROUP BY p.id"
        )
        rows = []
        for product_id, count in cur.fetchall():
            for index in range(int(count), IMAGES_PER_PRODUCT):
                rows.append((product_id, *_image_row(product_id, index)))
        if rows:
            progress(f"images: inserting {len(rows)} rows")
            execute_values(
                cur,
                "INSERT INTO product_images (product_id, content_hash, placeholder,"
                " variants, src, width, height, position) VALUES %s"
                " ON CONFLICT (product_id, content_hash) DO NOTHING",
                rows,
                page_size=1000,
            )
        cur.execute("SELECT count(*) FROM products")
        total_products = int(cur.fetchone()[0])
        cur.execute("SELECT count(*) FROM product_images")
        total_images = int(cur.fetchone()[0])
    _flush_redis(deploy)
    return {"products": total_products, "images": total_images}


def _flush_redis(deploy: Deployment) -> None:
    import redis

    client = redis.Redis.from_url(deploy.env["FM_REDIS_URL"])
    try:
        client.flushdb()
    finally:
        client.close()


# --- HTTP -----------------------------------------------------------------------------------


def documents(product_id: int) -> dict[str, tuple[str, dict[str, Any] | None]]:
    """The two measured documents and their variables, by name."""
    return {
        "product page": (PRODUCT_QUERY, {"id": str(product_id)}),
        f"products(first: {LIST_FIRST})": (LIST_QUERY, None),
    }


def graphql_path(query: str, variables: dict[str, Any] | None) -> str:
    """`/graphql?query=...&variables=...` (a GraphQL-over-HTTP GET)."""
    params = {"query": query}
    if variables is not None:
        params["variables"] = json.dumps(variables, separators=(",", ":"))
    return "/graphql?" + urllib.parse.urlencode(params, quote_via=urllib.parse.quote)


def _get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def _check_answer(name: str, status: int, body: bytes, product_id: int) -> dict[str, Any]:
    """The `data` of an answer, after checking it has no errors and the expected shape."""
    if status != 200:
        raise RuntimeError(f"{name}: HTTP {status}: {body[:300]!r}")
    answer = json.loads(body)
    if answer.get("errors"):
        raise RuntimeError(f"{name}: errors {answer['errors']}")
    data = answer.get("data")
    if not isinstance(data, dict):
        raise RuntimeError(f"{name}: no data: {body[:300]!r}")
    if "product" in data:
        product = data["product"]
        if not product or product.get("id") != str(product_id):
            raise RuntimeError(f"{name}: product {product_id} missing: {body[:300]!r}")
        if len(product["images"]) != IMAGES_PER_PRODUCT:
            raise RuntimeError(f"{name}: {len(product['images'])} images, not 3")
    else:
        edges = data["products"]["edges"]
        if len(edges) != LIST_FIRST:
            raise RuntimeError(f"{name}: {len(edges)} edges, not {LIST_FIRST}")
        short = [e["node"]["id"] for e in edges if len(e["node"]["images"]) != 3]
        if short:
            raise RuntimeError(f"{name}: products without 3 images: {short[:5]}")
    return data


def _executed(port: int) -> int:
    """The node's `fm_graphql_executed_operations` counter."""
    status, _, body = _get(port, "/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics: HTTP {status}")
    for line in body.decode().splitlines():
        if line.startswith(EXECUTED_METRIC + " "):
            return int(float(line.split()[1]))
    raise RuntimeError(f"/metrics has no {EXECUTED_METRIC}")


def measure_http(args: Any, deploy: Deployment | None = None) -> dict[str, Any]:
    """Queries/s, latency and CPU per query of both documents, cached and uncached, on the
    node and on the Ariadne peer, taking turns.

    With `deploy` (up and migrated, no node running) the data is prepared on it and the node
    and the peer started and stopped here, once per mode; without, a deployment of its own is
    made in a temporary directory and stopped again. Raises RuntimeError on any failed check."""
    opts = _options(args)
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk not found (apt-get install wrk)")
    if deploy is None:
        work = Path(tempfile.mkdtemp(prefix="fm-bench-graphql-http-"))
        own = Deployment(work, opts.python, opts.pool_max_size)
        try:
            own.up()
            return measure_http(opts, own)
        finally:
            own.stop()
            shutil.rmtree(work, ignore_errors=True)
    if deploy.node is not None:
        raise RuntimeError("measure_http starts its own node: stop the deployment's first")
    rest = _rest_module()
    peer_python = rest.Bench.ensure_peer_venv()
    peer_settings = _peer_settings(peer_python)
    progress(f"graphql http: {peer_settings}")
    data_sizes = prepare_data(deploy, max(opts.products, LIST_FIRST, opts.product_id))
    docs = documents(opts.product_id)
    paths = {name: graphql_path(query, variables) for name, (query, variables) in docs.items()}
    entries = _read_entries(opts.product_id)
    started = time.monotonic()
    results: dict[str, Any] = {
        "wrk": {"threads": opts.threads, "connections": opts.connections},
        "duration_s": opts.duration,
        "warmup_s": opts.warmup,
        "rounds": opts.rounds,
        "product_id": opts.product_id,
        "data": data_sizes,
        "documents": {name: {"query": q, "variables": v} for name, (q, v) in docs.items()},
        "peer": peer_settings,
        "load_average": {"start": _load()},
        "runs": {name: {} for name in docs},
        "peer_runs": {name: {} for name in docs},
        "ratios": {name: {} for name in docs},
    }
    answers: dict[str, dict[str, Any]] = {}
    images_dir = str(deploy.work / "images")
    for mode, mode_env in MODES.items():
        progress(f"graphql http: node ({mode}{', ' + str(mode_env) if mode_env else ''})")
        deploy.start_node(
            extra_env={**THROTTLE_ENV, "FM_IMAGE_STORAGE_DIR": images_dir, **mode_env}
        )
        peer: PeerProcess | None = None
        try:
            assert deploy.node is not None
            pid, port = deploy.node.pid, deploy.port
            peer = PeerProcess.start(deploy, peer_python, mode)
            progress(f"graphql http: peer ({mode}) ready on port {peer.port} (pid {peer.pid})")
            servers = {"ours": (pid, port), "peer": (peer.pid, peer.port)}
            for index, (name, path) in enumerate(paths.items()):
                status, headers, body = _get(port, path)
                data = _check_answer(f"{name} ({mode})", status, body, opts.product_id)
                answers.setdefault(name, {})[mode] = data
                cache_control = headers.get("cache-control", "")
                if "public" not in cache_control:
                    raise RuntimeError(f"{name} ({mode}): Cache-Control {cache_control!r}")
                cost = json.loads(body)["extensions"]["cost"]
                results["runs"][name].setdefault("cost", {})[mode] = {
                    "requested": cost["requestedQueryCost"],
                    "actual": cost["actualQueryCost"],
                }
                # The node wrote the entries the peer reads; the peer must answer its data
                # (in cached mode the first answer is executed, the second from its cache).
                for attempt in ("first", "second"):
                    status, _, body = _get(peer.port, path)
                    peer_data = _check_answer(
                        f"{name} (peer {mode}, {attempt})", status, body, opts.product_id
                    )
                    if peer_data != data:
                        raise RuntimeError(f"{name} ({mode}): the peer's data differs from ours")
                if opts.warmup > 0:
                    for server, (server_pid, server_port) in servers.items():
                        if server == "peer":
                            _renew_entries(deploy, port, path, entries[name], opts.warmup + 5)
                        progress(f"graphql http: {name} {mode} {server}: warm-up {opts.warmup}s")
                        url = f"http://127.0.0.1:{server_port}{path}"
                        rest.wrk_run(wrk, url, server_pid, opts, opts.warmup)
                by_server: dict[str, list[dict[str, Any]]] = {"ours": [], "peer": []}
                for round_index in range(opts.rounds):
                    # Servers take turns, each round (and document) starting with the other.
                    order = ["ours", "peer"] if (round_index + index) % 2 == 0 else ["peer", "ours"]
                    for server in order:
                        server_pid, server_port = servers[server]
                        if server == "peer":
                            _renew_entries(deploy, port, path, entries[name], opts.duration + 5)
                        for settle_pid, _ in servers.values():  # the last run's tail is not ours
                            _settle(rest, settle_pid)
                        label = f"{name} {mode} {server} {round_index + 1}"
                        load = results["load_average"][label] = _load()
                        progress(
                            f"graphql http: {label}/{opts.rounds}: wrk -t{opts.threads} "
                            f"-c{opts.connections} -d{opts.duration}s (load {load})"
                        )
                        url = f"http://127.0.0.1:{server_port}{path}"
                        executed_before = _executed(port) if server == "ours" else 0
                        run = rest.wrk_run(wrk, url, server_pid, opts, opts.duration)
                        if server == "ours" and run.get("requests"):
                            executed = _executed(port) - executed_before
                            run["executions_per_query"] = round(executed / run["requests"], 4)
                        if run["non_2xx_3xx"] or run["socket_errors"]:
                            progress(
                                f"graphql http: WARNING {label}: {run['non_2xx_3xx']} non-2xx, "
                                f"{run['socket_errors']} socket errors"
                            )
                        by_server[server].append(run)
                        progress(
                            f"graphql http: {label}: {run['rps']:,.0f} q/s, p99 "
                            f"{run['p99_ms']} ms, {run.get('server_cpu_us_per_req')} µs CPU/query"
                        )
                ours = results["runs"][name][mode] = rest.median_run(by_server["ours"])
                theirs = results["peer_runs"][name][mode] = rest.median_run(by_server["peer"])
                results["ratios"][name][mode] = versus(ours, theirs)
        finally:
            if peer is not None:
                peer_code = peer.stop()
                if peer_code not in (0, None):
                    progress(f"graphql http: peer ({mode}) exited {peer_code}; see {peer.log}")
            code = deploy.stop_node()
            log = deploy.node_log()
            if log:
                progress(f"graphql http: node ({mode}) logged {len(log)} lines, last: {log[-1]}")
            if code not in (0, None):
                progress(f"graphql http: node ({mode}) exited {code}")
    for name, by_mode in answers.items():
        if by_mode["cached"] != by_mode["uncached"]:
            raise RuntimeError(f"{name}: the cached and uncached nodes answer different data")
    results["answers_match"] = True
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    return results


# --- the Ariadne peer -----------------------------------------------------------------------


class PeerProcess:
    """`graphql_ariadne_peer.py` on uvicorn (one worker, its defaults) in its own session."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.port = port
        self.log = log

    @classmethod
    def start(cls, deploy: Deployment, peer_python: Path, mode: str) -> PeerProcess:
        """The peer in `mode` ("cached" or "uncached"), once it answers HTTP."""
        port = free_port()
        log = deploy.work / f"peer-{mode}.log"
        command = [str(peer_python), "-m", "uvicorn", "graphql_ariadne_peer:app"]
        command += ["--app-dir", str(PEER_APP.parent), "--host", "127.0.0.1", "--port", str(port)]
        command += PEER_UVICORN_OPTIONS
        env = {key: value for key, value in os.environ.items() if not key.startswith("FM_")}
        env |= {
            "FM_REDIS_URL": deploy.env["FM_REDIS_URL"],
            "FM_CATALOG_DSN": deploy.env["FM_CATALOG_DSN"],
            "PEER_GRAPHQL_MODE": mode,
        }
        proc = start_server(command, env, log)
        peer = cls(proc, port, log)
        deadline = time.monotonic() + PEER_READY_TIMEOUT_S
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                _get(port, "/graphql")  # any answer: it listens (after its lifespan started)
                return peer
            if proc.poll() is not None:
                raise RuntimeError(f"peer exited {proc.returncode}; see {log}")
            time.sleep(0.05)
        peer.stop()
        raise RuntimeError(f"peer not ready within {PEER_READY_TIMEOUT_S:.0f}s; see {log}")

    def stop(self) -> int:
        """SIGINT (then SIGKILL); the exit code."""
        return stop_process(self.proc)


def _peer_settings(peer_python: Path) -> str:
    """One line naming the peer, its versions and what differs from its defaults."""
    probe = (
        "from importlib.metadata import version as v; "
        "print(' '.join(v(p) for p in ('ariadne', 'graphql-core', 'uvicorn')))"
    )
    done = subprocess.run(
        [str(peer_python), "-c", probe], capture_output=True, text=True, check=False
    )
    versions = done.stdout.split() if done.returncode == 0 else []
    ariadne, core, uvicorn = [*versions, "?", "?", "?"][:3]
    return (
        f"peer: Ariadne {ariadne} (graphql-core {core}) on uvicorn {uvicorn} "
        f"{' '.join(PEER_UVICORN_OPTIONS)}, at its defaults (access log on, --log-level info; "
        "every request parsed and validated) but execute_get_queries=True (else a GET gets "
        "the explorer page); cached = a whole-result cache in Redis (60 s, 1 s when showing "
        "stock), uncached = PEER_GRAPHQL_MODE=uncached"
    )


def _read_entries(product_id: int) -> dict[str, list[tuple[str, str]]]:
    """The Final Market cache entries (namespace, id) the peer reads, by document."""
    return {
        "product page": [(NS_PRODUCT, str(product_id))],
        f"products(first: {LIST_FIRST})": [
            (NS_PRODUCT_LIST, json.dumps([LIST_FIRST, None, None], separators=(",", ":")))
        ],
    }


def _renew_entries(
    deploy: Deployment, port: int, path: str, entries: list[tuple[str, str]], needed_s: float
) -> None:
    """Make sure the entries the peer reads outlive its next run (`needed_s`): one that
    expires sooner is deleted and the node asked for `path` until it has stored it again (the
    peer only reads; a list page lives 60 s, which a long series of runs outlasts). Raises
    RuntimeError if the node does not store it within 10 s."""
    import redis

    client = redis.Redis.from_url(deploy.env["FM_REDIS_URL"])
    try:
        for ns, ident in entries:
            key, left_s = _entry_left_s(client, ns, ident)
            if left_s is not None and left_s >= needed_s:
                continue
            client.delete(key)
            deadline = time.monotonic() + 10.0
            while True:
                _get(port, path)  # the node's local layer serves it at most 1 s longer
                key, left_s = _entry_left_s(client, ns, ident)
                if left_s is not None and left_s >= needed_s:
                    progress(f"graphql http: renewed {ns} {ident} ({left_s:.0f}s left)")
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the node did not store {ns} {ident} again")
                time.sleep(0.25)
    finally:
        client.close()


def _entry_left_s(client: Any, ns: str, ident: str) -> tuple[str, float | None]:
    """(value key at the current version, its seconds to live or None if absent)."""
    from server.adapters.cache import keys

    ns_version = client.get(keys.version_key(ns, ident)) or b"0"
    entity_version = client.get(keys.entity_version_key(ns, ident)) or b"0"
    version = f"{ns_version.decode()}.{entity_version.decode()}"
    key = keys.value_key(ns, version, ident)
    pttl = int(client.pttl(key))
    return key, (pttl / 1000 if pttl >= 0 else None)


def _settle(rest: ModuleType, pid: int, timeout_s: float = 5.0) -> None:
    """Wait until the node is idle (under 10% of a core for 0.2 s), at most `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before = rest.cpu_seconds(pid)
        time.sleep(0.2)
        if rest.cpu_seconds(pid) - before <= 0.02:
            return


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def versus(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """Ours / the peer's queries/s and p99, and whether the goal (>= 1.5x the q/s at a p99 no
    worse) is met."""
    ratio = round(ours["rps"] / theirs["rps"], 2) if theirs["rps"] else None
    p99_ratio = round(ours["p99_ms"] / theirs["p99_ms"], 2) if theirs["p99_ms"] else None
    met = bool(ratio and ratio >= 1.5 and ours["p99_ms"] <= theirs["p99_ms"])
    return {"rps": ratio, "p99": p99_ratio, "goal_met": met}


def report_http(results: dict[str, Any]) -> list[str]:
    """Table lines of `measure_http`'s results."""
    wrk = results["wrk"]
    rounds = results.get("rounds", 1)
    lines = [
        f"GraphQL over HTTP: anonymous GET, one node and the Ariadne peer taking turns, wrk "
        f"-t{wrk['threads']} -c{wrk['connections']} -d{results['duration_s']}s (after "
        f"{results['warmup_s']}s warm-up), {rounds} round(s) each, the median run shown; "
        f"{results['data']['products']:,} products with 3 images each, hot id "
        f"{results['product_id']}; uncached = FM_GRAPHQL_RESULT_CACHE_TTL_S=0",
    ]
    if results.get("peer"):
        lines.append(f"  {results['peer']}")
    lines += [
        "",
        f"{'document':<22}{'mode':<10}{'server':<7}{'queries/s':>11}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'CPU µs/q':>10}{'exec/q':>8}",
    ]
    peer_runs = results.get("peer_runs", {})
    for name, by_mode in results["runs"].items():
        for mode in MODES:
            for server, run in (
                ("ours", by_mode.get(mode)),
                ("peer", peer_runs.get(name, {}).get(mode)),
            ):
                if run is None:  # ("cost": the documents' cost, not a run)
                    continue
                executions = run.get("executions_per_query")
                line = (
                    f"{name:<22}{mode:<10}{server:<7}{run['rps']:>11,.0f}{run['p50_ms']:>9.2f}"
                    f"{run['p99_ms']:>9.2f}{run.get('server_cpu_us_per_req', 0):>10.1f}"
                    + (f"{executions:>8.3f}" if executions is not None else f"{'-':>8}")
                )
                if run["non_2xx_3xx"] or run["socket_errors"]:
                    line += (
                        f"  ({run['non_2xx_3xx']} non-2xx, {run['socket_errors']} socket errors)"
                    )
                lines.append(line)
            ratio = results.get("ratios", {}).get(name, {}).get(mode)
            if ratio and ratio["rps"] is not None:
                verdict = "met" if ratio["goal_met"] else "NOT met"
                lines.append(
                    f"{'':<22}{'':<10}ours / peer: {ratio['rps']:.2f}x q/s, p99 "
                    f"{ratio['p99']:.2f}x the peer's (goal >= 1.5x at a p99 no worse: {verdict})"
                )
        # The peer as Ariadne ships (its uncached mode: every request parsed, validated and
        # executed, resolvers reading Redis) against each of the node's modes.
        default = peer_runs.get(name, {}).get("uncached")
        for mode in MODES if default else ():
            if by_mode.get(mode):
                ratio = versus(by_mode[mode], default)
                verdict = "met" if ratio["goal_met"] else "NOT met"
                lines.append(
                    f"{'':<22}ours {mode} / peer at Ariadne's defaults (no result cache): "
                    f"{ratio['rps']:.2f}x q/s, p99 {ratio['p99']:.2f}x ({verdict})"
                )
        cached, uncached = by_mode.get("cached"), by_mode.get("uncached")
        if cached and uncached:
            ratio = cached["rps"] / uncached["rps"]
            cost = by_mode.get("cost", {}).get("uncached")
            note = f", cost {cost['requested']} requested / {cost['actual']} actual" if cost else ""
            lines.append(f"{'':<22}ours cached / uncached: {ratio:.2f}x q/s{note}")
    lines.append(
        "peer cached: Ariadne with a whole-result cache in Redis added by this bench (Ariadne "
        "has none); peer uncached: Ariadne at its defaults, resolvers reading Redis"
    )
    lines.append(
        "CPU µs/q: the server process only (not Valkey or PostgreSQL); exec/q: operations "
        "the node executed per query (the rest answered by the result cache; slightly above 1 "
        "when uncached: requests in flight when wrk stops have executed but are not counted)"
    )
    return lines


# --- statements -----------------------------------------------------------------------------


def _unbatched_loader_class() -> Any:
    """A `BatchLoader` that dispatches every key on its own, at once (no batching; still one
    load per key per request, as any per-request memo would)."""
    from server.graphql import loaders

    class UnbatchedLoader(loaders.BatchLoader[Any, Any]):
        __slots__ = ()

        def _enqueue(self, key: Any) -> asyncio.Future[Any]:
            loop = self._loop_now()
            future: asyncio.Future[Any] = loop.create_future()
            self._futures[key] = future
            task = loop.create_task(self._run([key]))
            task.add_done_callback(loaders._retrieve)
            return future

    return UnbatchedLoader


@contextlib.contextmanager
def _without_dataloaders() -> Iterator[None]:
    """`Loaders` of this process build unbatched loaders inside the block."""
    from server.graphql import loaders

    original = loaders.BatchLoader
    loaders.BatchLoader = _unbatched_loader_class()  # type: ignore[misc]
    try:
        yield
    finally:
        loaders.BatchLoader = original  # type: ignore[misc]


def measure_statements(deploy: Deployment, firsts: tuple[int, ...] = STATEMENT_FIRSTS) -> dict:
    """SQL statements per query of `products(first: N)` (stock and images), with and without
    DataLoaders, cold and with the list cached but its stock expired. `deploy` must be up;
    products and images are added if missing (at least max(firsts) products)."""
    return asyncio.run(measure_statements_async(deploy, firsts))


async def measure_statements_async(
    deploy: Deployment, firsts: tuple[int, ...] = STATEMENT_FIRSTS
) -> dict[str, Any]:
    """`measure_statements` for a caller that already runs an event loop."""
    data_sizes = prepare_data(deploy, max(firsts))
    started = time.monotonic()
    rows = await _statements(deploy, firsts)
    return {
        "data": data_sizes,
        "query": STATEMENTS_QUERY,
        "rows": rows,
        "elapsed_s": round(time.monotonic() - started, 1),
    }


async def _statements(deploy: Deployment, firsts: tuple[int, ...]) -> list[dict[str, Any]]:
    from server.graphql.context import RequestContext
    from server.wiring.services import Services

    settings = deploy.settings(
        pool_max_size=10,
        image_storage_dir=str(deploy.work / "images"),
        node_id="bench-statements",
    )
    services = await Services.open(settings)
    try:
        executor = services.graphql.executor
        parsed = executor.parse(STATEMENTS_QUERY)

        async def run(first: int) -> tuple[dict[str, Any], dict[str, int]]:
            context = RequestContext(services, None, "127.0.0.1")
            before = services.router.totals()
            prepared = await executor.prepare(parsed, None, {"first": first}, context)
            response = await executor.execute(prepared)
            after = services.router.totals()
            counts = {
                "read_statements": after.read_statements - before.read_statements,
                "writes": after.writes - before.writes,
            }
            if response.get("errors"):
                raise RuntimeError(f"products(first: {first}): errors {response['errors']}")
            edges = response["data"]["products"]["edges"]
            if len(edges) != first or any(len(e["node"]["images"]) != 3 for e in edges):
                raise RuntimeError(f"products(first: {first}): unexpected answer")
            return response["data"], counts

        async def cold() -> None:
            await services.redis.flushdb()
            services.cache.invalidate_all_local()
            services.catalog.stock.forget()

        rows: list[dict[str, Any]] = []
        answers: dict[int, Any] = {}
        for loaders in ("dataloaders", "without"):
            block = _without_dataloaders() if loaders == "without" else contextlib.nullcontext()
            with block:
                for first in firsts:
                    await cold()
                    data, counts = await run(first)
                    rows.append({"first": first, "loaders": loaders, "caches": "cold", **counts})
                    # The list page is cached now; let its stock expire (as after 1 s).
                    services.catalog.stock.forget()
                    services.cache.invalidate_all_local()
                    data2, counts2 = await run(first)
                    rows.append(
                        {"first": first, "loaders": loaders, "caches": "list cached", **counts2}
                    )
                    for answer in (data, data2):
                        if answers.setdefault(first, answer) != answer:
                            raise RuntimeError(f"products(first: {first}): answers differ")
                    progress(
                        f"graphql statements: first {first}, {loaders}: cold "
                        f"{counts['read_statements']}, list cached/stock expired "
                        f"{counts2['read_statements']}"
                    )
        return rows
    finally:
        await services.close()


def report_statements(results: dict[str, Any]) -> list[str]:
    """Table lines of `measure_statements`' results."""
    table: dict[tuple[int, str], dict[str, int]] = {}
    for row in results["rows"]:
        table.setdefault((row["first"], row["caches"]), {})[row["loaders"]] = row["read_statements"]
    lines = [
        "SQL statements per query (counted at the pool), products(first: N) with stock and "
        "3 images per product",
        "",
        f"{'query':<22}{'caches':<30}{'DataLoaders':>12}{'without':>9}",
    ]
    labels = {"cold": "cold", "list cached": "list cached, stock expired"}
    for (first, caches), counts in table.items():
        lines.append(
            f"{f'products(first: {first})':<22}{labels[caches]:<30}"
            f"{counts.get('dataloaders', '-'):>12}{counts.get('without', '-'):>9}"
        )
    writes = sum(row["writes"] for row in results["rows"])
    if writes:
        lines.append(f"(writes: {writes} transactions, expected none)")
    return lines


# --- trying it ------------------------------------------------------------------------------


def main() -> int:
    """Both sections on a deployment of their own; one JSON line, then the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fm-bench-graphql-http-"))
    deploy = Deployment(work, args.python, args.pool_max_size)
    started = time.monotonic()
    try:
        deploy.up()
        http = measure_http(args, deploy)
        statements = measure_statements(deploy)
    except KeyboardInterrupt:
        progress("interrupted; stopping everything")
        return 130
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        progress(f"failed: {exc}")
        return 1
    finally:
        deploy.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(
        json.dumps(
            {
                "benchmark": "graphql_http",
                "machine": machine(),
                "http": http,
                "statements": statements,
                "elapsed_s": round(time.monotonic() - started, 1),
            }
        )
    )
    print()
    print("\n".join(report_http(http)))
    print()
    print("\n".join(report_statements(statements)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
