"""stylecast serving: torch-free gRPC server over exported bundles (ONNX Runtime / TensorRT)."""
