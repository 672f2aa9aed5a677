"""stylecast export: PyTorch generators -> ONNX graphs, TensorRT engines and verified serving bundles."""
