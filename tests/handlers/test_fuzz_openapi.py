"""schemathesis against a real `finalmarket serve` process: every operation of
`/api/v1/openapi.json`, anonymous, as a shopper and as an administrator, with valid and with
invalid inputs generated from the document (issue 16).

What must hold for every generated request: no 5xx, a status the document lists for the
operation, the documented media type, and a body that matches the documented schema (the
problem schema for errors, `Cart` for cart answers); and the node logs no error. It found
that a header value with trailing whitespace (`Authorization: Bearer `) closed the
connection without an answer (tests/adapters/test_http1.py). The node's whole log of the run
must hold neither the callers' tokens nor the password. The number of examples is bounded
(`EXAMPLES` per operation, caller and mode), so the run stays within a minute on the shared
2-core machine; failures are collected over all operations and reported together.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.helpers.catalog import add_product
from tests.helpers.processes import (
    SECRET_KEY,
    cli_env,
    free_port,
    run_cli,
    server_settings,
    started,
    wait_ready,
)

pytestmark = pytest.mark.usefixtures("clean_data")

EXAMPLES = 12  # per operation, caller and generation mode
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
PASSWORD = "fuzzing-password-1"


def _post_json(url: str, body: dict[str, Any], token: str | None = None) -> Any:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def node(
    infra_env: dict[str, str], tmp_path: Path
) -> Iterator[tuple[str, dict[str, dict[str, str]]]]:
    """A `serve` process (rate limits out of the fuzzer's way), with two products, a shopper
    holding one in the cart, and an administrator: (base URL, caller name -> headers)."""
    (tmp_path / "config").mkdir()
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = cli_env(
        tmp_path / "config",
        {
            **server_settings(infra_env),
            "FM_SECRET_KEY": SECRET_KEY,
            "FM_PORT": str(port),
            "FM_RATELIMIT_IP_PER_SECOND": "100000",
            "FM_RATELIMIT_IP_BURST": "100000",
            "FM_RATELIMIT_USER_PER_SECOND": "100000",
            "FM_RATELIMIT_USER_BURST": "100000",
        },
    )
    created = run_cli(
        "users", "create", "--email", "root@example.com", "--password", PASSWORD, "--admin",
        env=env,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    products = [add_product(infra_env["FM_CATALOG_DSN"], stock=5) for _ in range(2)]
    with started("serve", env=env, stderr_path=tmp_path / "serve.log") as child:
        wait_ready(base_url, child)
        session = _post_json(
            base_url + "/api/v1/sessions", {"email": "root@example.com", "password": PASSWORD}
        )
        shopper = _post_json(
            base_url + "/api/v1/users",
            {"email": "fuzz@example.com", "password": PASSWORD, "name": "Fuzz"},
        )
        _post_json(
            base_url + "/api/v1/cart/items",
            {"product_id": products[0], "quantity": 2},
            shopper["token"],
        )
        yield (
            base_url,
            {
                "anonymous": {},
                "shopper": {"Authorization": f"Bearer {shopper['token']}"},
                "admin": {"Authorization": f"Bearer {session['token']}"},
            },
        )
        assert child.proc.poll() is None, child.stderr()  # it kept serving throughout
        # Bad input is answered, never an unhandled error (the transport failure this suite
        # found closed connections without an answer and logged only this).
        log = child.stderr()
        errors = [line for line in log.splitlines() if '"level":"error"' in line]
        assert errors == [], errors[:3]
        # Nothing secret reached the log of a whole run: not the tokens every request carried
        # (headers, cookies and query strings alike), not the password that signed in.
        for secret in (shopper["token"], session["token"], PASSWORD):
            assert secret not in log


def _fuzz(
    operation: Any, mode: GenerationMode, base_url: str, caller: str, headers: dict[str, str]
) -> tuple[int, list[str]]:
    """Run `EXAMPLES` generated requests of `operation` as `caller`: (requests, failures)."""
    failures: list[str] = []
    calls = 0

    @given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis_settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,  # the same requests every run: a failure reproduces
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def call(case: Any) -> None:
        nonlocal calls
        calls += 1
        try:
            case.call_and_validate(base_url=base_url, headers=headers, checks=CHECKS, timeout=10)
        except Exception as failure:  # every check's failure, kept for the report
            request = case.as_curl_command(headers=headers)
            failures.append(f"{operation.label} as {caller} ({mode.value}): {failure}\n{request}")

    try:
        call()
    except Unsatisfiable:
        # Nothing of this operation can be made invalid (no parameters, no body): valid
        # requests cover it.
        assert mode is GenerationMode.NEGATIVE, operation.label
    return calls, failures


def test_every_operation_answers_as_documented_for_generated_requests(
    node: tuple[str, dict[str, dict[str, str]]],
) -> None:
    base_url, callers = node
    schema = schemathesis.openapi.from_url(base_url + "/api/v1/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15, [op.label for op in operations]
    failures: list[str] = []
    calls = 0
    started_at = time.monotonic()
    for operation in operations:
        for caller, headers in callers.items():
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                made, failed = _fuzz(operation, mode, base_url, caller, headers)
                calls += made
                failures += failed
    elapsed = time.monotonic() - started_at
    print(f"schemathesis: {calls} requests over {len(operations)} operations in {elapsed:.1f}s")
    assert failures == [], "\n\n".join(failures[:10]) + f"\n\n({len(failures)} in all)"
    assert calls >= len(operations) * len(callers), calls
