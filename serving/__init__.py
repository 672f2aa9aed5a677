"""stylecast serving: torch-free gRPC server over exported bundles (ONNX Runtime / TensorRT).

Modules: server (StyleServer: gRPC + health + reflection + metrics), style_service (stylecast.v1.StyleService),
repository (hot-reloaded model repository), models (LoadedModel / StyleGAN2Model: map + batched synthesize),
batcher (dynamic batching), backends (ONNX Runtime, TensorRT, selection), latents (numpy seed/truncation/mixing
math), codecs (PNG / JPEG / WebP / raw), auth (bearer tokens), metrics (Prometheus), logs (JSON lines),
config, errors, client (StyleClient), offline (the server's pipeline in-process, without a server).
"""
