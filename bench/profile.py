"""Where one request's CPU goes: a sampled profile of a pinned server under h2load.

    python -m bench.profile [--root DIR] [--in-flight 64] [--payload mnist-png] [--seconds 5]
    python -m bench.profile --rpc batch --in-flight 4 --payload raw    # PredictBatch of 64
    python -m bench.profile --rpc infer --inclusive 40    # OIP ModelInfer, and time by function
    python -m bench.profile --rpc stream --payload raw    # PredictStream, one stream

Starts `python -m mnist_service serve --workers 1 --no-access-log` from DIR (default: this
checkout; point it at a `git worktree` of an older commit to compare) pinned to core 1, drives
unary Predict (or PredictBatch with 64 images a call, or the Open Inference Protocol's
ModelInfer with the image as tritonclient sends a file) with h2load pinned to core 0, samples the
server with py-spy, and reads the server's CPU time
from /proc. Prints CPU per request and its split by the package of the innermost Python
frame (native code is counted under the package that called it), and the functions that
take the most samples themselves; with `--inclusive N`, also the N functions most often on the
stack (the time of a function with its callees). Not a test: it measures.
Needs h2load and py-spy (`pip install py-spy`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from mnist_service.constants import MODEL_NAMES, Architecture

from .load import h2load_path
from .payloads import KINDS, render
from .servers import pinned, service_flags

ROOT = Path(__file__).resolve().parent.parent

CATEGORIES = (
    ("onnxruntime", "onnxruntime"),
    ("image decode (Pillow)", "PIL/"),
    ("PNG inflate (zlib)", "zlib"),
    ("numpy", "numpy/"),
    ("HTTP/2 (h2, hpack, hyperframe)", ("h2/", "hpack/", "hyperframe/")),
    ("grpclib", "grpclib/"),
    ("betterproto2", "betterproto2/"),
    ("mnist_service", "mnist_service/"),
    ("event loop, sockets (asyncio)", ("asyncio/", "selectors.py", "socket.py")),
    ("threads, locks, futures", ("threading.py", "concurrent/futures")),
)


def category(frame: str) -> str:
    """The category of one py-spy frame, "function (path:line)" (paths may be relative)."""
    path = "/" + frame.rpartition(" (")[2]
    for name, needles in CATEGORIES:
        for needle in (needles,) if isinstance(needles, str) else needles:
            if "/" + needle in path:
                return name
    return "other Python"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(
    root: Annotated[Path, typer.Option(help="Checkout whose server to profile.")] = ROOT,
    in_flight: Annotated[int, typer.Option(help="Concurrent calls (h2load -m).")] = 64,
    payload: Annotated[str, typer.Option(help=f"One of {', '.join(KINDS)}.")] = "mnist-png",
    seconds: Annotated[int, typer.Option(help="Sampled seconds.")] = 5,
    rpc: Annotated[
        str,
        typer.Option(
            help="predict, batch (PredictBatch of 64), infer (OIP ModelInfer) or stream "
            "(PredictStream: one stream from bench.stream_client; --in-flight is ignored)."
        ),
    ] = "predict",
    model: Annotated[Architecture, typer.Option(help="conv or mlp.")] = "conv",
    top: Annotated[int, typer.Option(help="How many of the hottest functions to list.")] = 15,
    inclusive: Annotated[
        int, typer.Option(help="Also list this many functions by inclusive time (on the stack).")
    ] = 0,
) -> None:
    """Profile a pinned server under load and print where a request's CPU goes."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        raise SystemExit("py-spy not found: pip install py-spy")
    from training.data import load_mnist

    images, _ = load_mnist("test")
    count = BATCH_IMAGES if rpc == "batch" else 1
    items = [render(payload, image, i) for i, image in enumerate(images[:count])]
    service = "mnist.Mnist"
    if rpc == "batch":
        fields = (_field(1, _field(1, item)) for item in items)  # MnistImage{data}
        body, method = b"".join(fields), "PredictBatch"
    elif rpc == "infer":  # as tritonclient sends a file: BYTES [1] in raw_input_contents
        tensor = _field(1, b"image_file") + _field(2, b"BYTES") + _field(3, b"\x01")  # shape [1]
        raw = len(items[0]).to_bytes(4, "little") + items[0]
        body = _field(1, MODEL_NAMES[model].encode()) + _field(5, tensor) + _field(7, raw)
        service, method = "inference.GRPCInferenceService", "ModelInfer"
    elif rpc == "stream":
        body, method = b"", "PredictStream"
    else:
        body, method = _field(1, items[0]), "Predict"
    command = [sys.executable, "-m", "mnist_service", "serve", "--address", "[::1]:0",
               "--workers", "1", "--log-format", "json", "--no-access-log",
               "--model-architecture", model]  # fmt: skip
    if "--http-address" in service_flags(root):  # an older checkout may not have HTTP
        command += ["--http-address", "off"]
    server = subprocess.Popen(
        pinned(1, command),
        cwd=root, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stderr is not None
        port = None
        for line in server.stderr:
            entry = json.loads(line)
            if str(entry.get("message", "")).startswith("serving"):
                port = entry["port"]
                break
        if port is None:
            raise SystemExit("the server did not start")
        with tempfile.TemporaryDirectory() as tmp:
            body_file = Path(tmp) / "body.bin"
            body_file.write_bytes(b"\0" + len(body).to_bytes(4, "big") + body)
            samples = Path(tmp) / "samples.txt"
            stream = [sys.executable, "-m", "bench.stream_client", "--address", f"[::1]:{port}",
                      "--payload", payload, "--seconds", str(seconds + 5)]  # fmt: skip
            load = subprocess.Popen(
                pinned(0, stream) if rpc == "stream" else
                pinned(0, [h2load_path(), "-D", str(seconds + 3), "-c", "1", "-m", str(in_flight),
                           "-d", str(body_file), "-H", "content-type: application/grpc",
                           "-H", "te: trailers", f"http://[::1]:{port}/{service}/{method}"]),
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            time.sleep(3.5 if rpc == "stream" else 1.5)  # the stream client loads MNIST first
            cpu_before, wall_before = cpu_seconds(server.pid), time.monotonic()
            subprocess.run(
                pinned(0, [py_spy, "record", "--pid", str(server.pid), "--duration", str(seconds),
                           "--rate", "250", "--format", "raw", "--output", str(samples),
                           "--nonblocking"]),
                check=True, capture_output=True,
            )  # fmt: skip
            cpu = cpu_seconds(server.pid) - cpu_before
            wall = time.monotonic() - wall_before
            output, _ = load.communicate(timeout=seconds + 60)
            rate = json.loads(output)["images_per_s"] if rpc == "stream" else _rate(output)
            counts, leaves, stacks = _categorise(samples)
    finally:
        server.terminate()
        server.wait(30)
    label = f"{method} {payload} x{count}" if count > 1 else f"{method} {payload}"
    _report(root, label, in_flight, rate, cpu / wall, counts, leaves, top)
    if inclusive:
        _report_inclusive(stacks, sum(counts.values()), cpu / wall / rate * 1e6, inclusive)


BATCH_IMAGES = 64


def _field(number: int, data: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return bytes([number << 3 | 2]) + _varint(len(data)) + data


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _rate(h2load_output: str) -> float:
    for line in h2load_output.splitlines():
        if line.startswith("finished in"):
            return float(line.split(",")[1].split()[0])
    raise SystemExit(f"cannot read h2load's rate:\n{h2load_output}")


def _categorise(samples: Path) -> tuple[Counter[str], Counter[str], Counter[str]]:
    """Samples by category of their innermost frame, by the innermost frame itself, and by
    every function on the stack (each counted once a sample: inclusive time)."""
    counts: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    stacks: Counter[str] = Counter()
    for line in samples.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        stacks.update(dict.fromkeys({_function(frame) for frame in frames}, int(count)))
        # The innermost frame that is not the idle wait of the event loop itself.
        counts[category(frames[-1])] += int(count)
        leaves[frames[-1]] += int(count)
    return counts, leaves, stacks


def _function(frame: str) -> str:
    """`Class.method (package/module.py:42)` -> `Class.method (module.py)`: lines merged."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rpartition(':')[0].rpartition('/')[2]})" if where else name


def _report_inclusive(stacks: Counter[str], total: int, per_request_us: float, top: int) -> None:
    """The functions most often on the stack: what a request spends in each, callees included."""
    print("\n| on the stack (inclusive) | share | us/request |\n|---|--:|--:|")
    outermost = max(stacks.values(), default=0)  # the CLI and the event loop's own frames
    below = [(name, count) for name, count in stacks.most_common() if count < 0.9 * outermost]
    for name, count in below[:top]:
        print(f"| `{name}` | {count / total:.0%} | {count / total * per_request_us:,.0f} |")


def _report(
    root: Path,
    label: str,
    in_flight: int,
    rate: float,
    busy: float,
    counts: Counter[str],
    leaves: Counter[str],
    top: int,
) -> None:
    total = sum(counts.values())
    per_request_us = busy / rate * 1e6
    commit = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    print(f"\n{root} ({commit}): {label}, {in_flight} in flight, server on one core")
    print(f"{rate:,.0f} req/s; server busy {busy:.0%} of a core: {per_request_us:,.0f} us/request")
    print("\n| where | share | us/request |\n|---|--:|--:|")
    for name, count in counts.most_common():
        print(f"| {name} | {count / total:.0%} | {count / total * per_request_us:,.0f} |")
    print("\n| hottest functions (own samples) | share | us/request |\n|---|--:|--:|")
    for frame, count in leaves.most_common(top):
        print(f"| `{frame}` | {count / total:.0%} | {count / total * per_request_us:,.0f} |")


if __name__ == "__main__":
    typer.run(main)
