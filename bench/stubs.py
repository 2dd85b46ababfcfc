"""grpcio stubs for mnist.proto and inference.proto, generated on first use into bench/_gen
(git-ignored).

The benchmark's baselines and checker use grpcio, an independent gRPC stack, so they need the
classic `mnist_pb2` / `mnist_pb2_grpc` modules rather than the service's betterproto2 code.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "mnist.proto"
PROTOS = (PROTO, ROOT / "inference.proto")
GEN = Path(__file__).resolve().parent / "_gen"


def _generate() -> None:
    GEN.parent.mkdir(exist_ok=True)
    # Generate into a fresh directory and rename it into place, so concurrent processes (the
    # harness and the baselines it starts) never import half-written modules.
    staging = Path(tempfile.mkdtemp(prefix="_gen-", dir=GEN.parent))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT}", f"--python_out={staging}",
         f"--grpc_python_out={staging}", *(str(proto) for proto in PROTOS)],
        check=True, timeout=60,
    )  # fmt: skip
    try:
        staging.replace(GEN)
    except OSError:  # another process won the race; its output is as good as ours
        for file in staging.iterdir():
            file.unlink()
        staging.rmdir()


def load() -> tuple[ModuleType, ModuleType]:
    """`(mnist_pb2, mnist_pb2_grpc)`, regenerated when a proto is newer than the stubs."""
    generated = [GEN / f"{proto.stem}_pb2_grpc.py" for proto in PROTOS]
    newest = max(proto.stat().st_mtime for proto in PROTOS)
    if not all(path.exists() and path.stat().st_mtime >= newest for path in generated):
        if GEN.exists():
            for file in GEN.iterdir():
                file.unlink()
            GEN.rmdir()
        _generate()
    if str(GEN) not in sys.path:
        sys.path.insert(0, str(GEN))
    if str(ROOT) not in sys.path:  # training/ (MNIST loading) ships only in the checkout
        sys.path.append(str(ROOT))
    return importlib.import_module("mnist_pb2"), importlib.import_module("mnist_pb2_grpc")


def load_inference() -> tuple[ModuleType, ModuleType]:
    """`(inference_pb2, inference_pb2_grpc)`: the Open Inference Protocol's stubs."""
    load()
    return importlib.import_module("inference_pb2"), importlib.import_module("inference_pb2_grpc")
