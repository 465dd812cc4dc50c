"""The edge tests: `finalmarket cluster` as a child process (see `tests/helpers/cluster.py`)
against the suite's PostgreSQL and Valkey, reached over real HTTP and WebSockets."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    """An empty config directory, so no `config/*.toml` applies to a command."""
    path = tmp_path / "config"
    path.mkdir()
    return path
