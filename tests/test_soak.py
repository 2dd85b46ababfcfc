"""The soak in its short form: a few seconds of mixed, hostile traffic against a real server.

`nox -s soak` runs the same script for a minute; here it runs briefly so that CI sees every
kind of call (bad images, 1 ms deadlines, client cancels, abandoned streams, batches) end in
an expected status, with no warning in the server's log and no leaked file descriptors.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_short_soak_passes_its_acceptance_bounds(tmp_path: Path) -> None:
    report_file = tmp_path / "soak.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--seconds", "6", "--warmup", "2",
         "--clients", "2", "--json", str(report_file)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=False,
    )  # fmt: skip

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(report_file.read_text())
    assert report["problems"] == []
    # Every kind of outcome happened, and nothing else did.
    assert {"OK", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "CANCELLED"} <= set(report["statuses"])
    assert report["unexpected_statuses"] == []
    assert report["server_warnings"] == 0
    assert report["fds_end"] <= report["fds_start"]
