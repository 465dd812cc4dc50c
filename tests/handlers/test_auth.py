"""Sign-up, sign-in, sign-out over real HTTP: tokens, cookies, CSRF, and precise problems."""

from __future__ import annotations

import json
from typing import Any

import pytest
from tornado.httpclient import HTTPResponse

from server.wiring.settings import Settings
from tests.helpers.deployment import make_settings
from tests.helpers.http import call, problem

pytestmark = pytest.mark.usefixtures("clean_data")


@pytest.fixture
def settings(infra_env: dict[str, str]) -> Settings:
    return make_settings(infra_env, cookie_secure=False)


async def sign_up(http_client: Any, base_url: str, email: str = "ada@example.com") -> Any:
    return await call(
        http_client,
        base_url + "/api/v1/users",
        "POST",
        {"email": email, "password": "correct horse", "name": "Ada"},
    )


def cookies_of(response: HTTPResponse) -> dict[str, str]:
    found = {}
    for header in response.headers.get_list("Set-Cookie"):
        name, _, rest = header.partition("=")
        found[name] = rest.split(";")[0]
    return found


@pytest.mark.gen_test(timeout=30)
async def test_sign_up_returns_user_and_token_and_sets_http_only_cookie(
    http_client: Any, base_url: str
) -> None:
    response = await sign_up(http_client, base_url)
    assert response.code == 201
    body = json.loads(response.body)
    assert body["user"]["email"] == "ada@example.com" and body["token"]
    session_cookie = next(
        h for h in response.headers.get_list("Set-Cookie") if h.startswith("fm_session=")
    )
    assert "HttpOnly" in session_cookie and "SameSite=Lax" in session_cookie
    me = await call(http_client, base_url + "/api/v1/me", Authorization=f"Bearer {body['token']}")
    assert json.loads(me.body)["id"] == body["user"]["id"]


@pytest.mark.gen_test(timeout=30)
async def test_sign_in_with_right_password_and_refusal_with_wrong_one(
    http_client: Any, base_url: str
) -> None:
    await sign_up(http_client, base_url)
    ok = await call(
        http_client,
        base_url + "/api/v1/sessions",
        "POST",
        {"email": "ADA@example.com", "password": "correct horse"},
    )
    assert ok.code == 200 and json.loads(ok.body)["token"]
    for email, password in (("ada@example.com", "wrong horse"), ("nobody@example.com", "x")):
        bad = await call(
            http_client,
            base_url + "/api/v1/sessions",
            "POST",
            {"email": email, "password": password},
        )
        assert bad.code == 401
        assert problem(bad)["detail"] == "email or password is wrong"


@pytest.mark.gen_test(timeout=30)
async def test_taken_email_is_a_409_problem(http_client: Any, base_url: str) -> None:
    await sign_up(http_client, base_url)
    again = await sign_up(http_client, base_url)
    assert again.code == 409
    assert problem(again)["type"] == "/problems/conflict"


@pytest.mark.gen_test(timeout=30)
async def test_bad_bodies_get_precise_problems(http_client: Any, base_url: str) -> None:
    url = base_url + "/api/v1/users"
    malformed = await call(http_client, url, "POST", b'{"email": ')
    assert malformed.code == 400 and problem(malformed)["type"] == "/problems/malformed-json"
    wrong_type = await call(http_client, url, "POST", b"email=a", **{"Content-Type": "text/plain"})
    assert wrong_type.code == 415
    missing = await call(http_client, url, "POST", {"email": "a@example.com"})
    assert missing.code == 422
    assert [e["field"] for e in problem(missing)["errors"]] == ["password"]
    not_object = await call(http_client, url, "POST", [1, 2])
    assert not_object.code == 422
    short = await call(http_client, url, "POST", {"email": "a@example.com", "password": "x"})
    assert short.code == 422 and "password" in problem(short)["detail"]
    huge = await call(http_client, url, "POST", b'{"email": "' + b"a" * (1024 * 1024) + b'"}')
    assert huge.code == 413 and problem(huge)["type"] == "/problems/body-too-large"
    # A lone surrogate is valid JSON but no text: the password hasher could not encode it.
    lone = b'{"email": "b@example.com", "password": "correct horse \\ud800"}'
    surrogate = await call(http_client, url, "POST", lone)
    assert surrogate.code == 400 and "lone UTF-16 surrogate" in problem(surrogate)["detail"]
    paired = b'{"email": "b@example.com", "password": "correct horse \\ud83d\\ude00"}'
    assert (await call(http_client, url, "POST", paired)).code == 201


@pytest.mark.gen_test(timeout=30)
async def test_forged_or_malformed_tokens_are_401(http_client: Any, base_url: str) -> None:
    me = base_url + "/api/v1/me"
    assert (await call(http_client, me)).code == 401
    assert (await call(http_client, me, Authorization="Bearer forged-token")).code == 401
    assert (await call(http_client, me, Authorization="Basic YTpi")).code == 401


@pytest.mark.gen_test(timeout=30)
async def test_cookie_sign_out_needs_csrf_token_and_revokes_the_session(
    http_client: Any, base_url: str
) -> None:
    signed_up = await sign_up(http_client, base_url)
    cookies = cookies_of(signed_up)
    cookie_header = f"fm_session={cookies['fm_session']}; fm_csrf={cookies['fm_csrf']}"
    url = base_url + "/api/v1/sessions"
    refused = await call(http_client, url, "DELETE", Cookie=cookie_header)
    assert refused.code == 403 and problem(refused)["type"] == "/problems/csrf"
    out = await call(
        http_client, url, "DELETE", Cookie=cookie_header, **{"X-CSRF-Token": cookies["fm_csrf"]}
    )
    assert out.code == 204
    token = json.loads(signed_up.body)["token"]
    after = await call(http_client, base_url + "/api/v1/me", Authorization=f"Bearer {token}")
    assert after.code == 401


class TestRateLimit:
    """A flood from one address gets 429 with Retry-After and RateLimit headers."""

    @pytest.fixture
    def settings(self, infra_env: dict[str, str]) -> Settings:
        return make_settings(infra_env, ratelimit_ip_per_second=1.0, ratelimit_ip_burst=3)

    @pytest.mark.gen_test(timeout=30)
    async def test_requests_over_the_burst_are_429_with_headers(
        self, http_client: Any, base_url: str
    ) -> None:
        url = base_url + "/api/v1/me"
        codes = [(await call(http_client, url)).code for _ in range(3)]
        assert codes == [401, 401, 401]  # allowed through the limiter (no credentials)
        limited = await call(http_client, url)
        assert limited.code == 429
        assert int(limited.headers["Retry-After"]) >= 1
        assert limited.headers["RateLimit-Policy"].startswith('"ip";q=3')
        assert problem(limited)["type"] == "/problems/rate-limited"
        # The wait is under a second: the body says what the header says (not "0.3s").
        wait = limited.headers["Retry-After"]
        assert wait == "1"
        assert problem(limited)["detail"] == f"too many requests; retry after {wait}s"
