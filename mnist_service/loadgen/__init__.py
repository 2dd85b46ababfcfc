"""Client-side load generation behind `mnist-service load`: measure a running deployment.

A tool beside the product: the server never imports it. Its modules, by concern:

    _workload.py   what is sent: digits drawn in MNIST form, or image files as they are
    _config.py     LoadConfig: what to load, how hard and for how long
    _runner.py     the callers on one event loop, and the run that drives them
    _report.py     progress, the final report, as text or JSON
    latency.py     the one definition of a percentile, shared with bench/ (public)

    config = LoadConfig(address="[::1]:50051", mode="unary", concurrency=32, duration_s=10,
                        payloads=generated_digits())
    report = run(config)                      # or `await run_load(config)` inside a loop
    print(format_report(report))
"""

from ._config import DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_REQUESTS, MODES, LoadConfig, Mode
from ._report import (
    CPU_BOUND_FRACTION,
    LoadReport,
    ModelCheck,
    Progress,
    format_progress,
    format_report,
)
from ._runner import run, run_load
from ._workload import MAX_IMAGE_FILES, Payload, generated_digits, load_images
from .latency import LatencySummary, median, percentile, summarise_latency

__all__ = [
    "CPU_BOUND_FRACTION",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_REQUESTS",
    "MAX_IMAGE_FILES",
    "MODES",
    "LatencySummary",
    "LoadConfig",
    "LoadReport",
    "Mode",
    "ModelCheck",
    "Payload",
    "Progress",
    "format_progress",
    "format_report",
    "generated_digits",
    "load_images",
    "median",
    "percentile",
    "run",
    "run_load",
    "summarise_latency",
]
