"""stylecast serving: torch-free gRPC server over exported bundles (ONNX Runtime / TensorRT).

Modules: server (StyleServer: gRPC + health + reflection + metrics), style_service (stylecast.v1.StyleService),
repository (hot-reloaded model repository), models (LoadedModel / LatentModel / StyleGAN2Model: map + batched
synthesize), dualstyle_model (DualStyleGANModel: style library + styled synthesis), fast_style_model, photo (the face
photo path of Stylize),
batcher (dynamic batching), backends (ONNX Runtime, TensorRT, selection), latents (numpy seed/truncation/mixing
math), codecs (PNG / JPEG / WebP / raw), auth (bearer tokens), metrics (Prometheus), logs (JSON lines),
config, errors, client (StyleClient), offline (the server's pipeline in-process, without a server).
"""
