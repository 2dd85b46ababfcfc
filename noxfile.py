"""Developer tasks; each session does one thing. `nox -l` lists them."""

from __future__ import annotations

import nox

nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "mypy", "proto_check", "tests"]


@nox.session
def tests(session: nox.Session) -> None:
    """Run the whole test suite (real servers, real clients, real MNIST)."""
    session.install("-e", ".[dev]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff: lint and formatting."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def mypy(session: nox.Session) -> None:
    """Strict type checks of mnist_service, training and export; the tests, relaxed."""
    session.install("-e", ".[train,test]", "mypy>=1.11")
    session.run("mypy")


@nox.session
def proto(session: nox.Session) -> None:
    """Regenerate mnist_service/_proto from mnist.proto."""
    session.install("grpcio-tools>=1.66", "betterproto2-compiler==0.10.*")
    session.run("python", "scripts/generate_proto.py")


@nox.session
def proto_check(session: nox.Session) -> None:
    """Fail when the committed generated code is stale."""
    session.install("grpcio-tools>=1.66", "betterproto2-compiler==0.10.*")
    session.run("python", "scripts/generate_proto.py", "--check")


@nox.session
def train(session: nox.Session) -> None:
    """Train both models with the defaults, then export them into weights/ (checked).

    Two steps, since export builds on training and not the reverse: `python -m training` writes
    checkpoints/, `python -m export onnx` makes each ONNX file. Arguments go to training, e.g.
    `nox -s train -- --threads 2`.
    """
    session.install("-e", ".[train]")
    session.run("python", "-m", "training", *session.posargs, "--arch", "all",
                "--checkpoint-dir", "checkpoints")  # fmt: skip
    for arch in ("conv", "mlp"):
        session.run("python", "-m", "export", "onnx", f"checkpoints/mnist_{arch}.pt",
                    "--arch", arch)  # fmt: skip


@nox.session
def export(session: nox.Session) -> None:
    """Export a checkpoint to ONNX, e.g. `nox -s export -- onnx ckpt.pt --arch conv ...`."""
    session.install("-e", ".[train]")
    session.run("python", "-m", "export", *session.posargs)


@nox.session
def robustness(session: nox.Session) -> None:
    """Accuracy on MNIST drawn in real-world ways (docs/accuracy.md), both shipped models.

    e.g. `nox -s robustness -- --limit 1000 --jobs 2`; `--address HOST:PORT` adds a server.
    """
    session.install("-e", ".")  # numpy, Pillow and onnxruntime: no torch
    args = session.posargs or []
    session.run(
        "python", "-m", "export", "robustness",
        "weights/mnist_convnet.onnx", "weights/mnist_mlp.onnx", *args,
    )  # fmt: skip


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmark against two baselines (not a test; needs h2load): tables, bench-results/*.json.

    `nox -s bench` also rewrites docs/benchmarks.md; `nox -s bench -- --quick` takes two minutes.
    (Loading your own deployment is `mnist-service load`.)
    """
    session.install("-e", ".[test]")  # grpcio + grpcio-tools: the baselines and the checks
    session.run("python", "-m", "bench.run", *session.posargs)


@nox.session
def preprocess_speed(session: nox.Session) -> None:
    """Per-image preprocessing cost per input kind, on one core (not a test).

    e.g. `nox -s preprocess_speed -- --images 200 --json out.json`.
    """
    session.install("-e", ".[test]")
    session.run("taskset", "-c", "1", "python", "-m", "bench.preprocess_speed", *session.posargs,
                external=True)  # fmt: skip


@nox.session
def soak(session: nox.Session) -> None:
    """Ten minutes of mixed, hostile traffic: RSS slope per process, statuses, fds, tasks.

    Not a test. e.g. `nox -s soak -- --minutes 10 --workers 2`; exits 1 when a bound breaks
    (a slope over 1 MB per 10 minutes, counts not back to idle: docs/operations.md).
    """
    session.install("-e", ".[test]")
    session.run("python", "-m", "bench.soak", *session.posargs)


@nox.session
def scaleout(session: nox.Session) -> None:
    """Three replicas behind nginx: drain one, kill one, restart both, under load (not a test).

    Needs nginx (apt). Per phase: failures by status, calls/s, p50/p99, calls per replica;
    e.g. `nox -s scaleout -- --steady 20 --json scaleout.json`; exits 1 when a bound breaks.
    """
    session.install("-e", ".[test]")
    session.run("python", "-m", "bench.scaleout", *session.posargs)


@nox.session
def profile(session: nox.Session) -> None:
    """Where a request's CPU goes (py-spy), e.g. `nox -s profile -- --root ../old-checkout`."""
    session.install("-e", ".[test]", "py-spy")
    session.run("python", "-m", "bench.profile", *session.posargs)
