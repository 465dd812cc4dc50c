"""Without an asset build the node still serves its API, but every storefront page says
loudly to run `scripts/build-assets`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from server.wiring.settings import Settings
from tests.helpers.storefront import fetch, storefront_settings

pytestmark = pytest.mark.usefixtures("clean_data")


@pytest.fixture
def settings(infra_env: dict[str, str], tmp_path: Path) -> Settings:
    return storefront_settings(infra_env, tmp_path / "no-build-here")


@pytest.mark.gen_test(timeout=30)
async def test_pages_fail_loudly_and_the_api_still_serves(http_client: Any, base_url: str) -> None:
    for path in ("/", "/offline", "/sign-in"):
        page = await fetch(http_client, base_url + path)
        assert page.code == 500, path
        assert b"run scripts/build-assets" in page.body, page.body
        assert b"manifest.json does not exist" in page.body
    asset = await fetch(http_client, base_url + "/sw.js")
    assert asset.code == 500 and b"scripts/build-assets" in asset.body
    api = await fetch(http_client, base_url + "/api/v1/products")
    assert api.code == 200
