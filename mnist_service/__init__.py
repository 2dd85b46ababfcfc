"""mnist-service: MNIST digit classification over gRPC (grpclib + onnxruntime)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mnist-service")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
