"""Every multi-key Redis command of the node stays in one Redis Cluster slot.

Two halves. The static scan reads the source of `server/`, `realtime/` and `handlers/`: every
Lua script is registered (no ad-hoc EVAL), every key a script touches is one of its declared
`KEYS` or is built from `ARGV[1]` (a declared tag's prefix, checked below), no Python call
sends several keys in one command, and every pipeline is non-transactional (a MULTI of keys in
several slots is refused by a cluster). The exercise runs every adapter that owns a script on
a real 3-master Valkey cluster through a client that records each script call, and proves with
redis-py's `key_slot` (CRC16, as the server computes it) that each call's keys, and the prefix
it derives keys from, hash to one slot; it also fails when a script of the code is never run
here, so a new script cannot escape the check. Key builders get hostile ids (braces, long ids)
too: a brace in an id must never change which slot a key lands on.
"""

from __future__ import annotations

import ast
import asyncio
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from realtime.broker import RedisBroker, stream_keys
from realtime.cable_sessions import CableSession, CableSessions, session_key
from realtime.presence import Presence, presence_keys
from server.adapters.cache import CachedLoader, keys
from server.adapters.cache.store import RedisStore
from server.adapters.db.pools import Database
from server.adapters.db.router import ShardRouter
from server.adapters.idempotency import IdempotencyStore
from server.adapters.ratelimit import LeasedRateLimiter, Limit, RateLimiter, limit_key
from server.adapters.sessions import SessionStore, _key_of_digest, token_digest
from server.graphql.persisted import PersistedQueries
from server.wiring.infra import ValkeyServer
from tests.helpers.caches import CountingLoader
from tests.helpers.deployment import make_settings
from tests.helpers.redis_cluster import valkey_cluster

ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("server", "realtime", "handlers")

# Commands scripts may call, and where their keys are: "first" (one key, the first argument),
# "all" (every argument is a key), or "none" (no key: TIME; classic PUBLISH, whose channel is
# not bound to a slot). A script calling anything else fails the scan until added here.
SCRIPT_COMMANDS = {
    "GET": "first",
    "SET": "first",
    "INCR": "first",
    "EXPIRE": "first",
    "PEXPIRE": "first",
    "PTTL": "first",
    "XADD": "first",
    "HSET": "first",
    "HDEL": "first",
    "HKEYS": "first",
    "HVALS": "first",
    "ZADD": "first",
    "ZREM": "first",
    "ZSCORE": "first",
    "ZRANGE": "first",
    "ZREMRANGEBYSCORE": "first",
    "DEL": "all",
    "EXISTS": "all",
    "PUBLISH": "none",
    "TIME": "none",
}
# Scripts whose command name is an argument: the broker's PUBLISH or SPUBLISH (a sharded
# channel is bound to its slot, so its argument must be a declared key).
DYNAMIC_COMMAND = re.compile(r"^ARGV\[\d+\]$")
DECLARED_KEY = re.compile(r"^KEYS\[\d+\]$")
DERIVED_KEY = re.compile(r"^ARGV\[(\d+)\] \.\. ")
LOCAL = re.compile(r"^\s*local (\w+) = (.+)$", re.MULTILINE)
CALL = re.compile(r"redis\.p?call\(")
# redis-py methods that send several keys in one command when given several.
MULTI_KEY_METHODS = {
    "mget", "mset", "msetnx", "delete", "unlink", "exists", "touch", "rename", "renamenx",
    "copy", "smove", "sunion", "sunionstore", "sinter", "sinterstore", "sintercard", "sdiff",
    "sdiffstore", "zunion", "zunionstore", "zinter", "zinterstore", "zdiff", "zdiffstore",
    "lmove", "blmove", "rpoplpush", "brpoplpush", "blpop", "brpop", "bzpopmin", "bzpopmax",
    "xread", "xreadgroup", "pfmerge", "pfcount", "bitop", "watch", "lmpop", "zmpop",
}  # fmt: skip


# --- the static scan ----------------------------------------------------------------------


@dataclass(frozen=True)
class Script:
    """A Lua script found in the source: where, and its text."""

    where: str
    text: str


def source_files() -> Iterator[tuple[str, ast.Module]]:
    """(path relative to the checkout, parsed module) of every Python file of the node."""
    for directory in SOURCE_DIRS:
        for path in sorted((ROOT / directory).rglob("*.py")):
            yield str(path.relative_to(ROOT)), ast.parse(path.read_text(), filename=str(path))


def scripts_in_source() -> list[Script]:
    """Every string constant of the node that calls `redis.call` / `redis.pcall` (docstrings
    that mention one aside)."""
    found = []
    for where, tree in source_files():
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
        }
        for node in ast.walk(tree):
            if id(node) in docstrings:
                continue
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and CALL.search(node.value)
            ):
                found.append(Script(f"{where}:{node.lineno}", node.value))
    return found


def split_arguments(text: str, start: int) -> tuple[list[str], int]:
    """The top-level, comma-separated arguments of the call whose `(` is at `start - 1`."""
    args, depth, current, i, quote = [], 0, "", start, ""
    while i < len(text):
        char = text[i]
        if quote:
            current += char
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
            current += char
        elif char in "({[":
            depth += 1
            current += char
        elif char in ")}]":
            if depth == 0:
                args.append(current.strip())
                return args, i
            depth -= 1
            current += char
        elif char == "," and depth == 0:
            args.append(current.strip())
            current = ""
        else:
            current += char
        i += 1
    raise AssertionError(f"unbalanced call in script: {text[start : start + 80]!r}")


def key_expressions(script: Script) -> Iterator[tuple[str, str]]:
    """(command, key expression) of every key argument of every call in `script`; a local
    variable is replaced by the expression it was assigned. Unknown commands come back as
    (command, "?")."""
    local = {name: value.strip() for name, value in LOCAL.findall(script.text)}
    for match in CALL.finditer(script.text):
        args, _end = split_arguments(script.text, match.end())
        command, rest = args[0], args[1:]
        if DYNAMIC_COMMAND.match(command):
            key_args = rest[:1] or ["?"]
        else:
            where = SCRIPT_COMMANDS.get(command.strip("'\"").upper())
            if where is None:
                yield command, "?"
                continue
            key_args = {"first": rest[:1], "all": rest, "none": []}[where]
        for key in key_args:
            yield command, local.get(key, key)


def derived_prefixes(script: Script) -> set[int]:
    """The ARGV positions (0-based) `script` builds key names from."""
    return {
        int(found.group(1)) - 1
        for _command, key in key_expressions(script)
        if (found := DERIVED_KEY.match(key))
    }


def script_key_problems(script: Script) -> list[str]:
    """What in `script` might touch a key outside its declared slot: a key argument that is
    neither a declared `KEYS[n]` nor built from an `ARGV[n]` prefix (the exercise checks that
    prefix's slot), or a command this test does not know."""
    problems = []
    for command, key in key_expressions(script):
        if key == "?":
            problems.append(f"{script.where}: {command} is not known to this test (add it)")
        elif not (DECLARED_KEY.match(key) or DERIVED_KEY.match(key)):
            problems.append(f"{script.where}: {command} {key} is neither KEYS[n] nor ARGV[n] ..")
    return problems


def registered_script_names() -> dict[str, set[str]]:
    """Per file, the names passed to `register_script(...)`."""
    found: dict[str, set[str]] = {}
    for where, tree in source_files():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "register_script"
            ):
                assert len(node.args) == 1 and isinstance(node.args[0], ast.Name), (
                    f"{where}:{node.lineno}: register_script takes a module-level constant here"
                )
                found.setdefault(where, set()).add(node.args[0].id)
    return found


def script_constants() -> dict[str, dict[str, str]]:
    """Per file, module-level `NAME = "...redis.call..."` constants."""
    found: dict[str, dict[str, str]] = {}
    for where, tree in source_files():
        for node in tree.body:
            if (
                isinstance(node, ast.Assign)
                and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
                and CALL.search(node.value.value)
            ):
                found.setdefault(where, {})[node.targets[0].id] = node.value.value
    return found


def python_multi_key_problems() -> list[str]:
    """Python calls that could put several keys (or a MULTI) in one command."""
    problems = []
    for where, tree in source_files():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            name, at = node.func.attr, f"{where}:{node.lineno}"
            if name in {"eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro"}:
                problems.append(f"{at}: .{name}() bypasses register_script (and this scan)")
            elif name == "transaction":
                problems.append(f"{at}: .transaction() is a MULTI (one slot only on a cluster)")
            elif name == "pipeline":
                flags = {kw.arg: kw.value for kw in node.keywords}
                off = flags.get("transaction")
                if not (isinstance(off, ast.Constant) and off.value is False):
                    problems.append(f"{at}: pipeline() without transaction=False is a MULTI")
            elif name in MULTI_KEY_METHODS:
                starred = any(isinstance(arg, ast.Starred) for arg in node.args)
                if starred or len(node.args) > 1:
                    problems.append(f"{at}: .{name}() with several keys")
    return problems


def test_every_script_is_registered_and_touches_only_its_declared_slot() -> None:
    scripts = scripts_in_source()
    assert len(scripts) >= 10, [s.where for s in scripts]  # the scan does find them
    problems = [problem for script in scripts for problem in script_key_problems(script)]
    assert not problems, "\n".join(problems)
    constants = script_constants()
    registered = registered_script_names()
    assert sum(len(names) for names in constants.values()) == len(scripts), (
        "a script that is not a module-level constant: " + str([s.where for s in scripts])
    )
    unregistered = [
        f"{where}:{name}"
        for where, names in constants.items()
        for name in names
        if name not in registered.get(where, set())
    ]
    # The broker's script is imported by benchmarks too: registered in its own module.
    assert not unregistered, unregistered


def test_no_python_call_sends_several_keys_or_a_multi() -> None:
    problems = python_multi_key_problems()
    assert not problems, "\n".join(problems)


def test_the_scan_catches_what_it_is_for() -> None:
    """The checks above can fail: each kind of mistake is found in a made-up script/source."""
    assert script_key_problems(Script("x", "redis.call('GET', 'plain:key')"))
    assert script_key_problems(Script("x", "redis.call('DEL', KEYS[1], ARGV[2])"))
    assert script_key_problems(Script("x", "redis.call('SUNIONSTORE', KEYS[1], KEYS[2])"))
    assert script_key_problems(Script("x", "redis.call(ARGV[6], ARGV[1], 'm')"))
    assert script_key_problems(Script("x", "local k = 'a' .. ARGV[1]\nredis.call('GET', k)"))
    assert derived_prefixes(Script("x", "local k = ARGV[3] .. 'v'\nredis.call('GET', k)")) == {2}
    assert not script_key_problems(
        Script("x", "redis.call('SET', ARGV[1] .. 'v' .. nv, ARGV[2], 'PX', ARGV[3])")
    )
    assert not script_key_problems(Script("x", "redis.call(ARGV[6], KEYS[4], cmsgpack.pack({1}))"))


# --- key builders -------------------------------------------------------------------------

HOSTILE_IDS: list[str | int] = [7, "42", "a{b}c", "}{", "{x}", "x" * 500, "ü-ñ", ""]


def hash_tag(key: str) -> str:
    """The part of `key` the cluster hashes (Redis' rule: the first `{...}` with content)."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def test_every_key_builder_keeps_a_group_in_one_slot_whatever_the_id() -> None:
    for raw in HOSTILE_IDS:
        ident = keys.id_part(raw)
        for ns in ("product", "product_list", "user", "session", "fragment"):
            group = [
                keys.version_key(ns, ident),
                keys.entity_version_key(ns, ident),
                keys.value_key(ns, "3.4", ident),
                keys.lock_key(ns, "3.4", ident),
                keys.prefix(ns, ident) + "anything",
            ]
            assert len({key_slot(k.encode()) for k in group}) == 1, group
            assert hash_tag(group[0]) == f"cache:{ns}:{keys.bucket(ident)}", group[0]
        text = str(raw)
        stream = f"inventory:product:{text}"
        if "{" not in text and "}" not in text:  # streams are named by the code, never by users
            assert len({key_slot(k.encode()) for k in stream_keys(stream)}) == 1
        limit = Limit("ip", 1.0, 5)
        assert hash_tag(limit_key(limit, text)).startswith("rl:ip:")
    for product_id in (1, 99, 123456):
        tag = "{inventory:product:" + str(product_id) + "}"
        assert {key_slot(k.encode()) for k in presence_keys(product_id)} == {key_slot(tag.encode())}
        assert {key_slot(k.encode()) for k in stream_keys(f"inventory:product:{product_id}")} == {
            key_slot(tag.encode())
        }
    assert hash_tag(session_key("abc")) == "cable-session:abc"
    assert hash_tag(_key_of_digest(token_digest("token"))).startswith("session:")


# --- the exercise on a real cluster ------------------------------------------------------


@dataclass
class ScriptCall:
    """One script call as sent: its text, keys and arguments."""

    text: str
    keys: list[Any]
    args: list[Any]


class RecordingScript:
    """A registered script that records each call and runs it for real."""

    def __init__(self, inner: Any, text: str, calls: list[ScriptCall]) -> None:
        self._inner = inner
        self._text = text
        self._calls = calls

    async def __call__(self, keys: Any = None, args: Any = None, client: Any = None) -> Any:
        self._calls.append(ScriptCall(self._text, list(keys or []), list(args or [])))
        return await self._inner(keys=keys, args=args, client=client)


class RecordingCluster:
    """A real `RedisCluster` whose `register_script` records the calls of every script."""

    def __init__(self, inner: RedisCluster) -> None:
        self._inner = inner
        self.calls: list[ScriptCall] = []

    def register_script(self, text: str) -> RecordingScript:
        return RecordingScript(self._inner.register_script(text), text, self.calls)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@pytest.fixture(scope="module")
def three_masters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ValkeyServer]]:
    """A cluster of three masters without replicas (slot checks need no failover)."""
    with valkey_cluster(tmp_path_factory.mktemp("slots"), masters=3, replicas=0) as nodes:
        yield nodes


def as_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


@pytest.mark.gen_test(timeout=60)
async def test_every_script_runs_on_a_cluster_with_its_keys_in_one_slot(
    three_masters: list[ValkeyServer], infra_env: dict[str, str]
) -> None:
    inner = RedisCluster.from_url(three_masters[0].url)
    redis = RecordingCluster(inner)
    settings = make_settings(infra_env)
    db = await Database.open(settings)  # sessions are recorded in the catalog database
    router = ShardRouter.for_settings(db, settings)
    try:
        # The cache: misses, hits, lock polls, stores, unlocks, entity and namespace bumps.
        cache = CachedLoader(redis, node_id="slots")
        for raw in HOSTILE_IDS:
            await cache.get_or_load("product", raw, CountingLoader(raw), 30)
            cache.invalidate_all_local()
            await cache.get_or_load("product", raw, CountingLoader(raw), 30)
            await cache.bump("product", raw)
        await cache.get_or_load("product_list", "first=10&q=", CountingLoader(), 30)
        await cache.bump("product_list")
        store = RedisStore(redis)
        read = await store.read("user", "9", "token-a", 1000)
        assert read.locked
        assert (await store.poll("user", "9", read.version, "token-b", 1000)) == (None, False)
        assert await store.try_lock("user", "10", read.version, "token-b", 1000)
        await store.unlock("user", "9", read.version, "token-a")
        await cache.aclose()
        # Rate limits (GCRA, refund, leases), presence, the broker, sessions and the rest.
        limiter = RateLimiter(redis)
        limit = Limit("ip", 10.0, 5)
        for key in ("127.0.0.1", "user:{1}", "x" * 300):
            assert (await limiter.check(limit, key)).allowed
            await limiter.refund(limit, key, 1)
        assert (await LeasedRateLimiter(limiter).check(Limit("user", 100.0, 100), "u:1")).allowed
        published: list[tuple[str, Any]] = []

        async def publish(stream: str, message: Any) -> None:
            published.append((stream, message))

        presence = Presence(redis, "slots", publish)
        presence.viewer_joined(7)
        await presence.flush()
        assert published and published[0][1]["viewers"] == 1
        broker = RedisBroker(redis, "slots", lambda envelope: None, sharded=True)
        offsets = [await broker.publish("inventory:product:7", {"stock": 1})]
        offsets += await asyncio.gather(
            *(broker.publish(f"inventory:product:{n % 3}", {"n": n}) for n in range(9))
        )
        assert (await broker.position("inventory:product:7"))[0] == offsets[0][0]
        assert await broker.history_after("inventory:product:7", 0, offsets[0][0]) is not None
        rotated = await broker.rotate_epoch("inventory:product:7", offsets[0][1])
        assert rotated != offsets[0][1]
        assert await broker.rotate_epoch("inventory:product:7", offsets[0][1]) == rotated
        after = await broker.rotate_epoch_after_failover("inventory:product:7", "node:1")
        assert await broker.rotate_epoch_after_failover("inventory:product:7", "node:1") == after
        assert "inventory:product:7" in await broker.streams_in([key_slot(b"inventory:product:7")])
        sessions = SessionStore(redis, router)
        token = await sessions.create(3)
        assert (await sessions.resolve(token)) is not None
        await sessions.revoke(token)
        idempotency = IdempotencyStore(redis)
        assert await idempotency.claim(3, "k", "f") is None
        await idempotency.store(3, "k", "f", 200, {"ok": True})
        await idempotency.release(3, "k")
        await CableSessions(redis, 60).save(
            {"sid-a": CableSession(None, []), "sid-b": CableSession(3, [])}
        )
        await PersistedQueries(redis, 60).put("sha", "{ a }")
    finally:
        await inner.aclose()
        await router.close()
        await db.close()

    # Every script of the code ran here, each call's keys (and derived prefix) in one slot.
    ran = {call.text for call in redis.calls}
    missing = [script.where for script in scripts_in_source() if script.text not in ran]
    assert not missing, f"scripts this test never ran (add them above): {missing}"
    for call in redis.calls:
        slots = {key_slot(as_bytes(key)) for key in call.keys}
        for index in derived_prefixes(Script("", call.text)):  # names built in the script
            if index < len(call.args):  # (a branch without derived keys passes fewer)
                slots.add(key_slot(as_bytes(call.args[index]) + b"derived"))
        assert len(slots) == 1, (call.keys, call.args[:1], call.text[:60])
