"""The `finalmarket` command's grammar and help, and how its commands find their settings."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest

from server.wiring import infra
from server.wiring.cli import build_parser
from server.wiring.dev import admin_command
from tests.helpers.deployment import quiet
from tests.helpers.processes import cli_env, run_cli

Command = tuple[tuple[str, ...], argparse.ArgumentParser, str | None]


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = (), summary: str | None = None
) -> Iterator[Command]:
    """Every parser of the tree: its command path, itself, and the line its parent lists."""
    yield path, parser, summary
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            lines = {choice.dest: choice.help for choice in action._choices_actions}
            for name, child in action.choices.items():
                yield from commands(child, (*path, name), lines.get(name))


def test_every_command_has_a_description_and_every_option_a_help_line() -> None:
    problems = []
    for path, parser, summary in commands(build_parser()):
        name = " ".join(("finalmarket", *path))
        if path and not summary:
            problems.append(f"{name}: no help line in its parent's list")
        if not (parser.description or "").strip():
            problems.append(f"{name}: no description (-h)")
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                problems.append(f"{name} {'/'.join(action.option_strings) or action.dest}: no help")
    assert problems == [], "\n".join(problems)


def test_the_walk_sees_every_command() -> None:
    paths = {" ".join(path) for path, _, _ in commands(build_parser())}
    assert paths == {
        "",
        "dev",
        "cluster",
        "edge",
        "edge nginx",
        "edge haproxy",
        "infra",
        "infra up",
        "infra down",
        "migrate",
        "seed",
        "serve",
        "users",
        "users create",
        "settings",
    }


def test_the_dev_banners_admin_command_names_a_data_dir_given_on_the_command_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("sys.argv", [str(Path.cwd() / ".venv" / "bin" / "finalmarket"), "dev"])
    assert admin_command(None) == (
        ".venv/bin/finalmarket users create --email you@example.com"
        " --password 'a long passphrase' --admin"
    )
    assert " users create --data-dir '/tmp/my data' --email " in admin_command(Path("/tmp/my data"))


@pytest.fixture
def dev_dir(tmp_path: Path) -> Iterator[Path]:
    """A data directory for a `finalmarket infra up`; its servers are stopped after the test."""
    data_dir = tmp_path / "data"
    try:
        yield data_dir
    finally:
        infra.down(data_dir, log=quiet)


def test_users_create_finds_the_dev_servers_and_secret_by_itself(
    dev_dir: Path, tmp_path: Path
) -> None:
    env = cli_env(tmp_path)  # no FM_* at all (and an empty config directory)
    up = run_cli("infra", "up", "--data-dir", str(dev_dir), env=env)
    assert up.returncode == 0, up.stderr
    migrate = run_cli("migrate", "--data-dir", str(dev_dir), env=env)
    assert migrate.returncode == 0, migrate.stderr
    assert f"using the dev servers and secret key in {dev_dir}" in migrate.stderr

    args = ("users", "create", "--data-dir", str(dev_dir), "--email", "Root@Example.com")
    created = run_cli(*args, "--password", "correct horse", "--admin", env=env)
    assert created.returncode == 0, created.stderr
    match = re.fullmatch(r"created user (\d+) <root@example\.com> \(admin\)\n", created.stdout)
    assert match, created.stdout
    shards = json.loads(infra.settings_of(dev_dir)["FM_SHARDS"])  # type: ignore[index]
    user_id = int(match[1])
    conn = psycopg2.connect(shards[user_id % len(shards)]["primary"], connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT is_admin FROM users WHERE id = %s", (user_id,))
            assert cur.fetchall() == [(True,)]
    finally:
        conn.close()

    # An explicit variable wins over the data directory's secret.
    short = {**env, "FM_SECRET_KEY": "too short"}
    refused = run_cli(*args, "--password", "correct horse", env=short)
    assert refused.returncode == 2
    assert "FM_SECRET_KEY: Value error, must be at least 32 characters" in refused.stderr
    assert f"using the dev servers in {dev_dir}\n" in refused.stderr


def test_commands_without_settings_or_dev_servers_say_where_they_looked(tmp_path: Path) -> None:
    result = run_cli("migrate", "--data-dir", str(tmp_path / "none"), env=cli_env(tmp_path))
    assert result.returncode == 2
    assert "FM_CATALOG_DSN: required setting is missing" in result.stderr
    assert f"no dev servers in {tmp_path / 'none'} either" in result.stderr
