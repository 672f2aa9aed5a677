"""stylecast serving: torch-free gRPC server over exported bundles (ONNX Runtime / TensorRT).

Layers, bottom up (no module imports one above it):
- contracts and helpers: errors, config, latents (numpy seed/truncation/mixing math), codecs (PNG / JPEG / WebP /
  raw, photo decoding), tensors (protocol-neutral tensor declarations), golden (golden checks), backends (ONNX
  Runtime, TensorRT, selection), batcher (dynamic batching), photo (the face photo path), metrics, logs, auth;
- models: the protocol-neutral model interface (LoadedModel); latent_model: what the generator kinds share;
- the kinds, one module each: stylegan2_model, dualstyle_model, fast_style_model;
- kinds: the registry (manifest kind -> model class), the only module that knows every kind;
- repository (hot-reloaded model repository), verify (`stylecast export verify`), offline (the server's pipeline
  in-process);
- front ends, which ask models what they can do and never test their kind: plumbing (request ids, metrics, errors,
  deadlines), style_service (stylecast.v1.StyleService), inference (the Open Inference Protocol core) and kserve
  (its gRPC binding), server (StyleServer: gRPC + health + reflection + metrics); client (StyleClient).
"""
