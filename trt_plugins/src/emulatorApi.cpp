/*
 * C entry point of the CPU emulation library (libstylecast_emu.so): runs the real kernel source on host memory so
 * tests/trt_plugins/test_kernels_emulated.py can compare it with the PyTorch reference ops through ctypes.
 */
#include "cudaEmulation.h"
#include "stylecast/modulatedConv2d.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

namespace
{

void copyMessage(std::string const& message, char* buffer, int32_t bufferSize)
{
    if (buffer != nullptr && bufferSize > 0)
    {
        std::strncpy(buffer, message.c_str(), static_cast<size_t>(bufferSize) - 1);
        buffer[bufferSize - 1] = '\0';
    }
}

} // namespace

extern "C" __attribute__((visibility("default"))) int32_t stylecastEmuModulatedConv2d(int32_t dtype,
    int32_t const* dims, int32_t const* flags, float const* scalars, float const* filter, void const* const* inputs,
    void* out, char* message, int32_t messageSize)
{
    // dims: N, I, O, H, W, k, noiseBatch.  flags: demodulate, up, act, hasBias, hasSkip, filterSize,
    // filterOnDevice (pass the filter as the kernels' device pointer instead of by value), tensorCores (fp16: WMMA
    // GEMM instead of the fp32 SIMT kernel).
    // scalars: alpha, gain, clamp.  inputs: x, weight, styles, noise, bias, skip (nullptr when absent).
    stylecast::ModConvShape shape;
    shape.batch = dims[0];
    shape.inChannels = dims[1];
    shape.outChannels = dims[2];
    shape.height = dims[3];
    shape.width = dims[4];
    shape.kernelSize = dims[5];
    shape.noiseBatch = dims[6];
    shape.hasBias = flags[3] != 0;
    shape.hasSkip = flags[4] != 0;

    stylecast::ModConvAttributes attrs;
    attrs.demodulate = flags[0] != 0;
    attrs.up = flags[1];
    attrs.act = static_cast<stylecast::Activation>(flags[2]);
    attrs.filterSize = flags[5];
    attrs.tensorCores = flags[7] != 0;
    attrs.alpha = scalars[0];
    attrs.gain = scalars[1];
    attrs.clamp = scalars[2];
    if (attrs.filterSize > 0 && attrs.filterSize <= stylecast::kMAX_FILTER_SIZE)
    {
        std::copy(filter, filter + attrs.filterSize * attrs.filterSize, attrs.filter);
    }

    std::string const error = stylecast::validateModConv(shape, attrs);
    if (!error.empty())
    {
        copyMessage(error, message, messageSize);
        return -1;
    }
    stylecast::ModConvTensors tensors;
    tensors.x = inputs[0];
    tensors.weight = inputs[1];
    tensors.styles = inputs[2];
    tensors.noise = inputs[3];
    tensors.bias = inputs[4];
    tensors.skip = inputs[5];
    tensors.filterDevice = flags[6] != 0 ? filter : nullptr;
    tensors.out = out;

    // Poison the scratch so a kernel that reads memory it never wrote shows up as NaN in the output.
    size_t const bytes = stylecast::modConvWorkspaceSize(shape, attrs);
    std::vector<float> workspace((bytes + sizeof(float) - 1) / sizeof(float) + 1, std::nanf(""));
    int64_t const divergentBefore = stylecast::emu::divergentBarrierCount();
    int64_t const violationsBefore = stylecast::emu::violationCount();
    int32_t const status = stylecast::enqueueModulatedConv2d(
        dtype == 1 ? stylecast::DataKind::kHALF : stylecast::DataKind::kFLOAT, shape, attrs, tensors,
        workspace.data(), nullptr);
    if (status != 0)
    {
        copyMessage("enqueue failed", message, messageSize);
        return status;
    }
    if (stylecast::emu::divergentBarrierCount() != divergentBefore)
    {
        copyMessage("a __syncthreads() was reached by only part of a block", message, messageSize);
        return -2;
    }
    if (stylecast::emu::violationCount() != violationsBefore)
    {
        copyMessage(stylecast::emu::lastViolation(), message, messageSize);
        return -3;
    }
    copyMessage("", message, messageSize);
    return 0;
}

extern "C" __attribute__((visibility("default"))) size_t stylecastEmuWorkspaceSize(
    int32_t const* dims, int32_t const* flags)
{
    stylecast::ModConvShape shape;
    shape.batch = dims[0];
    shape.inChannels = dims[1];
    shape.outChannels = dims[2];
    shape.height = dims[3];
    shape.width = dims[4];
    shape.kernelSize = dims[5];
    stylecast::ModConvAttributes attrs;
    attrs.demodulate = flags[0] != 0;
    attrs.up = flags[1];
    return stylecast::modConvWorkspaceSize(shape, attrs);
}
