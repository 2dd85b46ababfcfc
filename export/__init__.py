"""Export of trained MNIST networks to ONNX (``onnx_export``) and ONNX model evaluation."""
