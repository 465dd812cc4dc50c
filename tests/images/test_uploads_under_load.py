"""Image work stays off the event loop: 20 concurrent uploads while 1,000 WebSocket clients
receive broadcasts.

Invariant: the p99 latency of a broadcast (sender to each of the 1,000 subscribers) while 20
photos are being uploaded and rendered stays within twice the idle p99 of the same node. The
idle figure is measured just before and just after the uploads and the larger one is used, so
that noise from other processes on a shared machine is counted on both sides.

Subscribers and the sender run in one Node process (the `ws` client,
tests/js/broadcast-latency.mjs) with one clock; the uploads come from a third process
(tests/images/upload_client.py), as clients of a node never share its event loop.
"""

from __future__ import annotations

import asyncio
import json
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from server.wiring.settings import Settings
from tests.helpers.catalog import insert_products
from tests.helpers.deployment import make_settings
from tests.helpers.photos import photo_jpeg

pytestmark = pytest.mark.usefixtures("clean_data")

PROJECT_ROOT = Path(__file__).resolve().parents[2]
JS_CLIENT = PROJECT_ROOT / "tests" / "js" / "broadcast-latency.mjs"
SUBSCRIBERS = 1000
UPLOADS = 20
BROADCAST_INTERVAL_MS = 50
IDLE_S = 3.0
EVENT_TIMEOUT_S = 60.0
# A latency bound on a shared 2-core machine: a round that misses it (another process took
# the CPU) is measured once more with fresh photos; the bound must hold in one of them.
ROUNDS = 2


@pytest.fixture
def settings(infra_env: dict[str, str], tmp_path: Path) -> Settings:
    return make_settings(
        infra_env,
        benchmark_channel=True,
        ratelimit_ip_burst=10_000,
        ratelimit_user_burst=10_000,
        image_storage_dir=str(tmp_path / "images"),
        image_queue_limit=UPLOADS,
    )


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Different 3-megapixel JPEG files (ROUNDS x 20, plus one to warm up): one photograph,
    each copy with its own JPEG comment (different bytes, so each is rendered, not
    deduplicated)."""
    base = photo_jpeg("landscape", 2000, 1500)
    directory = tmp_path_factory.mktemp("photos")
    paths = []
    for number in range(ROUNDS * UPLOADS + 1):  # the last one warms the node up
        comment = f"copy {number}".encode()
        segment = b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment
        path = directory / f"photo-{number}.jpg"
        path.write_bytes(base[:2] + segment + base[2:])
        paths.append(path)
    return paths


async def next_event(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), EVENT_TIMEOUT_S)
    assert line, "the Node client exited"
    event: dict[str, Any] = json.loads(line)
    return event


async def send(proc: asyncio.subprocess.Process, command: dict[str, Any]) -> None:
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(command).encode() + b"\n")
    await proc.stdin.drain()


async def measure_while(proc: asyncio.subprocess.Process, work: Any) -> dict[str, Any]:
    """Broadcast every BROADCAST_INTERVAL_MS while `work` runs; the latency figures."""
    await send(proc, {"start": {"interval_ms": BROADCAST_INTERVAL_MS}})
    await work
    await send(proc, {"stop": True})
    event = await next_event(proc)
    assert event["event"] == "measured", event
    return event


@pytest.mark.slow
@pytest.mark.gen_test(timeout=180)
async def test_broadcast_p99_during_20_uploads_stays_within_twice_idle(
    base_url: str,
    http_server: Any,
    admin: dict[str, str],
    photos: list[bytes],
    infra_env: dict[str, str],
) -> None:
    assert (JS_CLIENT.parent / "node_modules" / "ws").is_dir(), (
        "run `npm ci --prefix tests/js` (scripts/test does)"
    )
    (lamp,) = insert_products(infra_env["FM_CATALOG_DSN"], [("Desk Lamp", "brass", 10)])
    url = f"{base_url}/api/v1/products/{lamp}/images"
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(JS_CLIENT),
        "--url",
        base_url.replace("http://", "ws://") + "/cable",
        "--subscribers",
        str(SUBSCRIBERS),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert (await next_event(proc))["event"] == "ready"

        async def start_uploads(files: list[Path]) -> asyncio.subprocess.Process:
            """The uploader, started and imported, waiting for the word to begin."""
            uploader = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.images.upload_client",
                url,
                admin["Authorization"],
                *map(str, files),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                cwd=PROJECT_ROOT,
            )
            assert uploader.stdout is not None
            assert await asyncio.wait_for(uploader.stdout.readline(), 60) == b"ready\n"
            return uploader

        async def run_uploads(uploader: asyncio.subprocess.Process) -> list[int]:
            output, _ = await asyncio.wait_for(uploader.communicate(b"go\n"), 120)
            statuses: list[int] = json.loads(output)
            return statuses

        async def upload_all(files: list[Path]) -> list[int]:
            return await run_uploads(await start_uploads(files))

        # A node in service has its image worker running: start it (first upload) and let
        # the cable warm up before measuring.
        assert await upload_all(photos[-1:]) == [201]
        await measure_while(proc, asyncio.sleep(1.0))
        for round_number in range(ROUNDS):
            batch = photos[round_number * UPLOADS : (round_number + 1) * UPLOADS]
            uploader = await start_uploads(batch)
            idle = await measure_while(proc, asyncio.sleep(IDLE_S))
            uploads = asyncio.ensure_future(run_uploads(uploader))
            loaded = await measure_while(proc, uploads)
            statuses = uploads.result()
            idle_after = await measure_while(proc, asyncio.sleep(IDLE_S))
            idle_p99 = max(idle["p99_ms"], idle_after["p99_ms"])
            figures = f"idle before {idle}, during uploads {loaded}, idle after {idle_after}"
            print(f"round {round_number + 1}: {figures}")
            assert statuses == [201] * UPLOADS, figures
            assert idle["missing"] == loaded["missing"] == idle_after["missing"] == 0, figures
            assert loaded["broadcasts"] >= 20, figures  # the uploads took a while: an overlap
            if loaded["p99_ms"] <= 2 * idle_p99:
                break
        await send(proc, {"quit": True})
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert loaded["p99_ms"] <= 2 * idle_p99, figures
