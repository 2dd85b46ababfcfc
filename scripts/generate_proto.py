"""Generate the betterproto2 code in `mnist_service/_proto/` from the shipped protos.

`mnist.proto` becomes `_proto/mnist/` and `inference.proto` (the Open Inference Protocol)
`_proto/inference/`, one subpackage per proto package, sharing one descriptor pool.

    python scripts/generate_proto.py          # regenerate in place
    python scripts/generate_proto.py --check  # exit 1 if the committed code is stale

Needs `grpcio-tools` and `betterproto2-compiler` (the `dev` extra). The plugin is looked up
next to this interpreter, so it works inside a virtualenv that is not activated.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ("mnist.proto", "inference.proto")
TARGET = ROOT / "mnist_service" / "_proto"
OPTIONS = "client_generation=async,server_generation=async,google_protobuf_descriptors"


def generate(out: Path) -> None:
    """Run protoc with the betterproto2 plugin, writing into `out`."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT}",
            f"--python_betterproto2_out={out}",
            f"--python_betterproto2_opt={OPTIONS}",
            *(str(ROOT / proto) for proto in PROTOS),
        ],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def differences(left: Path, right: Path) -> list[str]:
    """Relative paths that differ between two trees (ignoring caches)."""
    comparison = filecmp.dircmp(left, right, ignore=["__pycache__"])
    found = [*comparison.left_only, *comparison.right_only, *comparison.diff_files]
    for name, sub in comparison.subdirs.items():
        found += [f"{name}/{path}" for path in differences(sub.left, sub.right)]
    return found


def main(argv: list[str]) -> int:
    """Regenerate, or with --check compare a fresh generation with the committed one."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "_proto"
        fresh.mkdir()
        generate(fresh)
        if "--check" in argv:
            stale = differences(fresh, TARGET) if TARGET.exists() else ["(missing)"]
            if stale:
                print(f"generated code is stale: {', '.join(stale)}; run `nox -s proto`")
                return 1
            print("generated code is up to date")
            return 0
        shutil.rmtree(TARGET, ignore_errors=True)
        shutil.copytree(fresh, TARGET)
        print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
