"""The WebSocket frame decoder under coverage-guided fuzzing (scripts/fuzz/wsframe: atheris)
for a bounded time: no exception but `ProtocolError`, the same outcome however the bytes are
split, re-encoded messages decode to themselves."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.fuzz import run_fuzz_target


def test_the_frame_decoder_survives_fuzzing(tmp_path: Path) -> None:
    run_fuzz_target("wsframe", tmp_path, min_runs=5_000)
