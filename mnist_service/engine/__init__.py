"""Preprocessing, batching and inference: numpy and onnxruntime, no gRPC here."""
