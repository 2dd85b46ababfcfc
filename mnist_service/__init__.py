"""mnist-service: MNIST digit classification over gRPC (grpclib + onnxruntime).

The public API is the async client; the server is run with `python -m mnist_service serve`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mnist-service")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

from .client import ItemFailure, MnistClient, ModelInfo, Prediction
from .tls import ClientTls

__all__ = ["ClientTls", "ItemFailure", "MnistClient", "ModelInfo", "Prediction", "__version__"]
