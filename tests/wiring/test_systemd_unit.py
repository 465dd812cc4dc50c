"""`config/finalmarket@.service` is a unit systemd accepts without a single warning."""

from __future__ import annotations

import subprocess
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
UNIT = PROJECT_ROOT / "config" / "finalmarket@.service"


def test_the_unit_file_verifies_cleanly(tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: point the install path at this checkout.
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/finalmarket", str(PROJECT_ROOT)))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # Unknown keys and bad values are only warnings (exit 0): refuse those too.
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert "ExecStart=/opt/finalmarket/.venv/bin/finalmarket serve --port %i" in UNIT.read_text()
