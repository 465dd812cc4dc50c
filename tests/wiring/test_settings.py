"""Settings: typed values from config files and FM_* variables; clear errors naming the setting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.wiring.settings import Settings, SettingsInvalid, load_settings, settings_table_markdown

REQUIRED = {
    "FM_CATALOG_DSN": "postgresql://postgres@127.0.0.1:5432/fm_catalog",
    "FM_SHARDS": json.dumps([{"primary": "postgresql://postgres@127.0.0.1:5432/fm_shard_0"}]),
    "FM_REDIS_URL": "redis://127.0.0.1:6379/0",
    "FM_SECRET_KEY": "x" * 48,
}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """A clean environment: no FM_* from outside, an empty config directory."""
    import os

    for key in list(os.environ):
        if key.startswith("FM_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("FM_CONFIG_DIR", str(tmp_path))
    for key, value in REQUIRED.items():
        monkeypatch.setenv(key, value)
    return monkeypatch


def test_required_settings_from_environment(env: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert settings.catalog_dsn == REQUIRED["FM_CATALOG_DSN"]
    assert settings.shards[0].primary.endswith("fm_shard_0")
    assert settings.shards[0].replica is None
    assert settings.port == 8888


def test_missing_setting_is_named(env: pytest.MonkeyPatch) -> None:
    env.delenv("FM_SECRET_KEY")
    with pytest.raises(SettingsInvalid) as caught:
        load_settings()
    assert str(caught.value) == "FM_SECRET_KEY: required setting is missing"


def test_malformed_number_is_named_with_the_value(env: pytest.MonkeyPatch) -> None:
    env.setenv("FM_PORT", "eighty")
    with pytest.raises(SettingsInvalid) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith("FM_PORT: ") and "'eighty'" in message
    assert "\n" not in message


def test_out_of_range_value_is_refused(env: pytest.MonkeyPatch) -> None:
    env.setenv("FM_POOL_MAX_SIZE", "0")
    with pytest.raises(SettingsInvalid, match=r"^FM_POOL_MAX_SIZE: .*greater than or equal to 1"):
        load_settings()


def test_malformed_json_setting_is_named(env: pytest.MonkeyPatch) -> None:
    env.setenv("FM_SHARDS", "[{not json")
    with pytest.raises(SettingsInvalid, match=r"^FM_SHARDS: malformed value"):
        load_settings()


def test_shard_entries_are_validated(env: pytest.MonkeyPatch) -> None:
    env.setenv("FM_SHARDS", json.dumps([{"primary": "x", "replika": "y"}]))
    with pytest.raises(SettingsInvalid, match=r"FM_SHARDS\[0\]\[replika\]: unknown setting"):
        load_settings()


def test_short_secret_is_refused_without_echoing_it(env: pytest.MonkeyPatch) -> None:
    env.setenv("FM_SECRET_KEY", "hunter2")
    with pytest.raises(SettingsInvalid) as caught:
        load_settings()
    assert "FM_SECRET_KEY" in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_config_files_layer_under_environment(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "finalmarket.toml").write_text("port = 9001\nlog_level = 'debug'\n")
    (tmp_path / "local.toml").write_text("port = 9002\n")
    assert load_settings().port == 9002
    assert load_settings().log_level == "debug"
    env.setenv("FM_PORT", "9003")
    assert load_settings().port == 9003


def test_unknown_key_in_config_file_is_refused(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "finalmarket.toml").write_text("prot = 9001\n")
    with pytest.raises(SettingsInvalid, match=r"^FM_PROT: unknown setting"):
        load_settings()


def test_missing_fm_config_file_is_named(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.setenv("FM_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(SettingsInvalid, match=r"^FM_CONFIG: no such file"):
        load_settings()


def test_every_setting_is_documented_in_the_readme(project_root: Path) -> None:
    readme = (project_root / "README.md").read_text()
    assert settings_table_markdown() in readme, "regenerate with `finalmarket settings`"
    for name, field in Settings.model_fields.items():
        assert field.description, f"{name} has no description"
