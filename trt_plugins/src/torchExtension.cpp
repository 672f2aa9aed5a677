/*
 * PyTorch binding (module `stylecast_ops_cuda`) of the StyleGAN2 modulated convolution kernels, the fast path of
 * training/ops/modulated_conv2d.py (impl="cuda" / "auto"). Forward only: the reference op stays the autograd path.
 *
 * Signature (positional, as training/ops/modulated_conv2d.py calls it):
 *   modulated_conv2d(x, weight, styles, demodulate, up, resample_filter, noise, bias, act, gain, clamp, skip,
 *                    out=None, poison=False)
 *   gain = -1 -> the activation's default (1 linear, sqrt(2) lrelu/relu); clamp = -1 -> none.
 *   out: an existing dense [N, O, H*up, W*up] tensor of x's dtype and device to write into (the device check
 *        passes a NaN-filled one, so an element the kernels never write shows up).
 *   poison: fill the scratch workspace with 0xFF bytes (NaN in fp32 and fp16) first, so a kernel that reads
 *        scratch it never wrote shows up as NaN in the output. For checks only: it costs one memset per call.
 */
#include "stylecast/modulatedConv2d.h"

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cmath>
#include <string>
#include <vector>

namespace
{

using torch::Tensor;

//! Optional tensor as a dense tensor of x's dtype on x's device (the reference casts the same way: `.to(dtype)`).
Tensor prepare(Tensor const& t, Tensor const& x)
{
    return t.to(x.device(), x.scalar_type()).contiguous();
}

Tensor modulatedConv2d(Tensor x, Tensor weight, Tensor styles, bool demodulate, int64_t up,
    c10::optional<Tensor> resampleFilter, c10::optional<Tensor> noise, c10::optional<Tensor> bias, std::string act,
    double gain, double clamp, c10::optional<Tensor> skip, c10::optional<Tensor> outArg, bool poison)
{
    TORCH_CHECK(x.is_cuda(), "stylecast_ops_cuda.modulated_conv2d: x must be a CUDA tensor");
    TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kFloat16,
        "stylecast_ops_cuda.modulated_conv2d: x must be float32 or float16, got ", x.scalar_type());
    bool const needsGrad = torch::GradMode::is_enabled()
        && (x.requires_grad() || weight.requires_grad() || styles.requires_grad()
            || (noise.has_value() && noise->requires_grad()) || (bias.has_value() && bias->requires_grad())
            || (skip.has_value() && skip->requires_grad()));
    TORCH_CHECK(!needsGrad,
        "stylecast_ops_cuda.modulated_conv2d is forward-only; use impl='ref' (or torch.no_grad()) when gradients "
        "are needed");
    TORCH_CHECK(x.dim() == 4 && weight.dim() == 4 && styles.dim() == 2,
        "modulated_conv2d expects x [N, I, H, W], weight [O, I, k, k], styles [N, I]");
    TORCH_CHECK(up == 1 || up == 2, "modulated_conv2d: up must be 1 or 2, got ", up);
    c10::cuda::CUDAGuard const guard(x.device());

    x = x.contiguous();
    weight = prepare(weight, x);
    styles = prepare(styles, x);
    int64_t const n = x.size(0);
    int64_t const outH = x.size(2) * up;
    int64_t const outW = x.size(3) * up;

    stylecast::ModConvAttributes attrs;
    attrs.demodulate = demodulate;
    attrs.up = static_cast<int32_t>(up);
    if (act == "linear")
    {
        attrs.act = stylecast::Activation::kLINEAR;
        attrs.gain = gain < 0 ? 1.0F : static_cast<float>(gain);
    }
    else if (act == "lrelu" || act == "relu")
    {
        attrs.act = stylecast::Activation::kLRELU;
        attrs.alpha = act == "relu" ? 0.0F : 0.2F;
        attrs.gain = gain < 0 ? static_cast<float>(std::sqrt(2.0)) : static_cast<float>(gain);
    }
    else
    {
        TORCH_CHECK(false, "modulated_conv2d: unknown activation '", act, "' (linear, lrelu or relu)");
    }
    attrs.clamp = clamp < 0 ? -1.0F : static_cast<float>(clamp);

    Tensor filter;
    if (resampleFilter.has_value() && (up == 2 || skip.has_value()))
    {
        filter = resampleFilter->to(x.device(), torch::kFloat32);
        if (filter.dim() == 1)
        {
            filter = torch::outer(filter, filter); // separable taps, as upfirdn2d applies them
        }
        TORCH_CHECK(filter.dim() == 2 && filter.size(0) == filter.size(1) && filter.size(0) >= 1
                && filter.size(0) <= stylecast::kMAX_FILTER_SIZE,
            "modulated_conv2d: resample_filter must be square [f, f] with f <= ", stylecast::kMAX_FILTER_SIZE);
        filter = filter.contiguous();
        attrs.filterSize = static_cast<int32_t>(filter.size(0));
    }

    stylecast::ModConvShape shape;
    shape.batch = static_cast<int32_t>(n);
    shape.inChannels = static_cast<int32_t>(x.size(1));
    shape.height = static_cast<int32_t>(x.size(2));
    shape.width = static_cast<int32_t>(x.size(3));
    shape.outChannels = static_cast<int32_t>(weight.size(0));
    shape.kernelSize = static_cast<int32_t>(weight.size(2));
    TORCH_CHECK(weight.size(1) == x.size(1) && weight.size(2) == weight.size(3) && styles.size(0) == n
            && styles.size(1) == x.size(1),
        "modulated_conv2d: shapes disagree: x ", x.sizes(), ", weight ", weight.sizes(), ", styles ", styles.sizes());

    Tensor noiseT;
    if (noise.has_value())
    {
        noiseT = prepare(*noise, x);
        TORCH_CHECK(noiseT.dim() == 4 && noiseT.size(1) == 1 && noiseT.size(2) == outH && noiseT.size(3) == outW
                && (noiseT.size(0) == 1 || noiseT.size(0) == n),
            "modulated_conv2d: noise must be [1 or N, 1, H*up, W*up], got ", noiseT.sizes());
        shape.noiseBatch = static_cast<int32_t>(noiseT.size(0));
    }
    Tensor biasT;
    if (bias.has_value())
    {
        biasT = prepare(*bias, x);
        TORCH_CHECK(biasT.dim() == 1 && biasT.size(0) == shape.outChannels, "modulated_conv2d: bias must be [O]");
        shape.hasBias = true;
    }
    Tensor skipT;
    if (skip.has_value())
    {
        skipT = prepare(*skip, x);
        TORCH_CHECK(skipT.dim() == 4 && skipT.size(0) == n && skipT.size(1) == shape.outChannels
                && skipT.size(2) * 2 == outH && skipT.size(3) * 2 == outW,
            "modulated_conv2d: skip must be [N, O, H*up/2, W*up/2], got ", skipT.sizes());
        shape.hasSkip = true;
    }
    std::string const error = stylecast::validateModConv(shape, attrs);
    TORCH_CHECK(error.empty(), "modulated_conv2d: ", error);

    std::vector<int64_t> const outShape{n, static_cast<int64_t>(shape.outChannels), outH, outW};
    Tensor out;
    if (outArg.has_value())
    {
        out = *outArg;
        TORCH_CHECK(out.device() == x.device() && out.scalar_type() == x.scalar_type() && out.is_contiguous()
                && out.sizes() == c10::IntArrayRef(outShape),
            "modulated_conv2d: out must be a contiguous ", x.scalar_type(), " tensor ", c10::IntArrayRef(outShape),
            " on ", x.device(), ", got ", out.scalar_type(), " ", out.sizes(), " on ", out.device());
    }
    else
    {
        out = torch::empty(outShape, x.options());
    }
    if (n == 0)
    {
        return out;
    }
    size_t const wsBytes = stylecast::modConvWorkspaceSize(shape, attrs);
    Tensor workspace
        = torch::empty({static_cast<int64_t>(std::max<size_t>(wsBytes, 1))}, x.options().dtype(torch::kUInt8));
    if (poison)
    {
        workspace.fill_(0xFF);
    }

    stylecast::ModConvTensors tensors;
    tensors.x = x.data_ptr();
    tensors.weight = weight.data_ptr();
    tensors.styles = styles.data_ptr();
    tensors.noise = noiseT.defined() ? noiseT.data_ptr() : nullptr;
    tensors.bias = biasT.defined() ? biasT.data_ptr() : nullptr;
    tensors.skip = skipT.defined() ? skipT.data_ptr() : nullptr;
    // The filter stays on the device: no host round trip (and no stream sync) per call.
    tensors.filterDevice = filter.defined() ? filter.data_ptr<float>() : nullptr;
    tensors.out = out.data_ptr();

    auto const kind = x.scalar_type() == torch::kFloat16 ? stylecast::DataKind::kHALF : stylecast::DataKind::kFLOAT;
    int32_t const status = stylecast::enqueueModulatedConv2d(
        kind, shape, attrs, tensors, workspace.data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(status == 0, "modulated_conv2d: kernel launch failed with status ", status);
    return out;
}

} // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)
{
    m.doc() = "stylecast fused CUDA ops (StyleGAN2 modulated convolution), forward only";
    m.def("modulated_conv2d", &modulatedConv2d, "Fused modulated conv2d (see training/ops/modulated_conv2d.py)",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("styles"), pybind11::arg("demodulate"),
        pybind11::arg("up"), pybind11::arg("resample_filter"), pybind11::arg("noise"), pybind11::arg("bias"),
        pybind11::arg("act"), pybind11::arg("gain"), pybind11::arg("clamp"), pybind11::arg("skip"),
        pybind11::arg("out") = pybind11::none(), pybind11::arg("poison") = false);
}
