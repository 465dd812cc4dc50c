"""The HTTP/1.1 layer under coverage-guided fuzzing (scripts/fuzz/http1: atheris) over real
TCP for a bounded time: every connection closes after the client's EOF, answers are
well-formed and never 5xx, nothing is logged as an error, good requests keep being served."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.fuzz import run_fuzz_target


def test_the_http1_layer_survives_fuzzing(tmp_path: Path) -> None:
    run_fuzz_target("http1", tmp_path, min_runs=2_000)
