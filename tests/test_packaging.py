"""The wheel carries the shipped weights, so `pip install .` serves without a checkout."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from mnist_service.constants import WEIGHT_FILES

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_contains_weights_proto_and_no_training_code(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("mnist_service-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    for file_name in WEIGHT_FILES.values():
        assert f"mnist_service/weights/{file_name}" in names
    assert "mnist_service/_proto/mnist/__init__.py" in names
    assert "mnist_service/_proto/py.typed" in names
    assert not any(name.startswith(("training/", "export/", "tests/")) for name in names)
