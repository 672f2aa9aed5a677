"""End to end with TensorRT (>= 10, Python bindings + a GPU): a one-node ONNX graph with the stylecast
ModulatedConv2d custom op is parsed with the plugin library loaded, built with a dynamic batch at one batch size,
serialised, deserialised and run at another, and compared with the reference op. Skipped where TensorRT is absent."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.ops.modulated_conv2d import modulated_conv2d
from training.ops.upfirdn2d import setup_filter

trt = pytest.importorskip("tensorrt", reason="TensorRT Python bindings not installed")
onnx = pytest.importorskip("onnx")

pytestmark = pytest.mark.gpu

if int(trt.__version__.split(".")[0]) < 10:
    pytest.skip(f"TensorRT >= 10 needed for IPluginV3, found {trt.__version__}", allow_module_level=True)


def one_node_graph(weight, bias, noise, *, demodulate, up, act, gain, clamp, filt, to_rgb=False):
    """ONNX model: inputs x [N, I, H, W], styles [N, I] (+ skip); weight/bias/noise as initializers."""
    from onnx import TensorProto, helper, numpy_helper

    o, i, k, _ = weight.shape
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", i, "H", "W"]),
              helper.make_tensor_value_info("styles", TensorProto.FLOAT, ["N", i])]
    node_inputs = ["x", "weight", "styles"]
    inits = [numpy_helper.from_array(weight, "weight")]
    if noise is not None:
        inits.append(numpy_helper.from_array(noise, "noise"))
        node_inputs.append("noise")
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "bias"))
        node_inputs.append("bias")
    if to_rgb:
        inputs.append(helper.make_tensor_value_info("skip", TensorProto.FLOAT, ["N", o, "Hs", "Ws"]))
        node_inputs.append("skip")
    attrs = dict(demodulate=int(demodulate), up=up, act=1 if act == "lrelu" else 0, alpha=0.2, gain=gain,
                 clamp=-1.0 if clamp is None else clamp, has_noise=int(noise is not None),
                 has_bias=int(bias is not None), has_skip=int(to_rgb), filter_size=filt.shape[0],
                 resample_filter=[float(v) for v in filt.reshape(-1)],
                 # Older ONNX parsers look plugins up by these attributes only, not by the node's domain.
                 plugin_namespace="stylecast", plugin_version="1")
    node = helper.make_node("ModulatedConv2d", node_inputs, ["y"], domain="stylecast", **attrs)
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([node], "modconv", inputs, [out], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("stylecast", 1)])
    return model.SerializeToString()


def build_engine(onnx_bytes, plugin_path, shapes, fp16):
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    registry = builder.get_plugin_registry()
    registry.load_library(plugin_path)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(onnx_bytes), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    assert blob is not None, "engine build failed"
    runtime = trt.Runtime(logger)
    return runtime.deserialize_cuda_engine(blob)


def run_engine(engine, feeds):
    context = engine.create_execution_context()
    for name, tensor in feeds.items():
        context.set_input_shape(name, tuple(tensor.shape))
        context.set_tensor_address(name, tensor.data_ptr())
    out = torch.empty(tuple(context.get_tensor_shape("y")), device="cuda", dtype=torch.float32)
    context.set_tensor_address("y", out.data_ptr())
    stream = torch.cuda.current_stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return out


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
@pytest.mark.parametrize("up", [1, 2])
def test_engine_matches_reference(plugin_build, up, fp16):
    if "plugin" not in plugin_build:
        pytest.skip("CUDA plugin library not built")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    rng = np.random.default_rng(0)
    i, o, k, h = 32, 48, 3, 8
    weight = (rng.standard_normal((o, i, k, k)) / math.sqrt(i * k * k)).astype(np.float32)
    bias = (rng.standard_normal(o) * 0.2).astype(np.float32)
    noise = (rng.standard_normal((1, 1, h * up, h * up)) * 0.1).astype(np.float32)
    filt = setup_filter([1, 3, 3, 1]).numpy()
    model = one_node_graph(weight, bias, noise, demodulate=True, up=up, act="lrelu", gain=math.sqrt(2), clamp=256.0,
                           filt=filt)
    # Built for batch 2 (opt), run at batch 3: the batch axis must stay dynamic through the plugin.
    engine = build_engine(model, plugin_build["plugin"],
                          {"x": ((1, i, h, h), (2, i, h, h), (4, i, h, h)), "styles": ((1, i), (2, i), (4, i))}, fp16)
    x = torch.randn(3, i, h, h, device="cuda")
    styles = torch.randn(3, i, device="cuda")
    got = run_engine(engine, {"x": x, "styles": styles})
    ref = modulated_conv2d(x, torch.from_numpy(weight).cuda(), styles, demodulate=True, up=up,
                           resample_filter=torch.from_numpy(filt).cuda(), noise=torch.from_numpy(noise).cuda(),
                           bias=torch.from_numpy(bias).cuda(), act="lrelu", clamp=256.0, impl="ref")
    scale = ref.abs().max().item()
    tol = 2e-2 if fp16 else 1e-4  # fp16 engines may also round the x/styles inputs TensorRT casts for the plugin
    assert (got - ref).abs().max().item() <= tol * scale


def test_engine_to_rgb_with_skip(plugin_build):
    if "plugin" not in plugin_build:
        pytest.skip("CUDA plugin library not built")
    rng = np.random.default_rng(1)
    i, o, h = 64, 3, 16
    weight = (rng.standard_normal((o, i, 1, 1)) / math.sqrt(i)).astype(np.float32)
    bias = (rng.standard_normal(o) * 0.2).astype(np.float32)
    filt = setup_filter([1, 3, 3, 1]).numpy()
    model = one_node_graph(weight, bias, None, demodulate=False, up=1, act="linear", gain=1.0, clamp=None,
                           filt=filt, to_rgb=True)
    engine = build_engine(model, plugin_build["plugin"],
                          {"x": ((1, i, h, h), (2, i, h, h), (4, i, h, h)), "styles": ((1, i), (2, i), (4, i)),
                           "skip": ((1, o, h // 2, h // 2), (2, o, h // 2, h // 2), (4, o, h // 2, h // 2))}, False)
    x = torch.randn(3, i, h, h, device="cuda")
    styles = torch.randn(3, i, device="cuda")
    skip = torch.randn(3, o, h // 2, h // 2, device="cuda")
    got = run_engine(engine, {"x": x, "styles": styles, "skip": skip})
    ref = modulated_conv2d(x, torch.from_numpy(weight).cuda(), styles, demodulate=False,
                           resample_filter=torch.from_numpy(filt).cuda(), bias=torch.from_numpy(bias).cuda(),
                           skip=skip, impl="ref")
    assert (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
