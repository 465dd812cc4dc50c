"""Runs a coverage-guided fuzz target of scripts/fuzz/ for a bounded time, as a test."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.helpers.processes import PROJECT_ROOT

#: Seconds each target fuzzes in the test suite (`scripts/fuzz/<target> -max_total_time=N`
#: runs it longer).
FUZZ_SECONDS = 12


def run_fuzz_target(name: str, artifacts: Path, min_runs: int) -> int:
    """Fuzz `scripts/fuzz/<name>` for `FUZZ_SECONDS`; fail with the crashing input and what
    the target said if it found one, or if it ran fewer than `min_runs` inputs. Returns how
    many it ran."""
    target = PROJECT_ROOT / "scripts" / "fuzz" / name
    result = subprocess.run(
        [
            sys.executable,
            str(target),
            f"-max_total_time={FUZZ_SECONDS}",
            f"-artifact_prefix={artifacts}/",
            "-print_final_stats=1",
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=FUZZ_SECONDS + 120,
        check=False,
    )
    said = result.stdout[-4000:] + result.stderr[-6000:]
    crashes = sorted(artifacts.glob("crash-*")) + sorted(artifacts.glob("timeout-*"))
    assert result.returncode == 0 and not crashes, (
        f"scripts/fuzz/{name} failed (exit {result.returncode}); inputs kept: "
        f"{[str(c) for c in crashes]}; replay with `scripts/fuzz/{name} -runs=0 FILE`\n{said}"
    )
    found = re.search(r"stat::number_of_executed_units: (\d+)", result.stderr)
    assert found is not None, said
    runs = int(found.group(1))
    assert runs >= min_runs, f"only {runs} inputs in {FUZZ_SECONDS}s\n{said}"
    return runs
