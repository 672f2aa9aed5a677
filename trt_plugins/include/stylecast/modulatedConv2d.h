/*
 * Modulated convolution (StyleGAN2, Karras et al. 2020): the host-side API shared by the TensorRT plugin and the
 * PyTorch extension. Both bindings only translate their tensor descriptions into the structs below and call
 * enqueueModulatedConv2d(); every kernel lives in modulatedConv2dKernels.cu.
 *
 * The op (training/ops/modulated_conv2d.py is the specification):
 *   up = 1: y = conv2d(x * styles, weight, padding = k / 2)
 *   up = 2: y = blur(conv_transpose2d(x * styles, weight^T, stride 2)), blur = FIR filter * 4 with padding p0
 *   y *= demod[n, o] (optional), y += noise, y = clamp(act(y + bias) * gain), y += upsample2d(skip)
 */
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#if defined(STYLECAST_EMULATE)
namespace stylecast
{
//! The CPU emulation (tests) has no CUDA runtime; a stream is an opaque, ignored pointer there.
using StreamHandle = void*;
} // namespace stylecast
#else
#include <cuda_runtime_api.h>
namespace stylecast
{
using StreamHandle = cudaStream_t;
} // namespace stylecast
#endif

namespace stylecast
{

//! Largest FIR filter (per side) the kernels accept; StyleGAN2 uses 4 ([1, 3, 3, 1]).
constexpr int32_t kMAX_FILTER_SIZE = 8;

//! Added under the square root of the demodulation coefficients, as in the reference (all-zero styles stay finite).
constexpr float kDEMOD_EPS = 1e-8F;

enum class DataKind : int32_t
{
    kFLOAT = 0, //!< float32 tensors
    kHALF = 1   //!< float16 tensors (all accumulation and the demodulation stay in float32)
};

enum class Activation : int32_t
{
    kLINEAR = 0,
    kLRELU = 1 //!< leaky ReLU with slope alpha for negative inputs
};

//! Everything that is fixed when the layer is created (plugin fields / extension arguments).
struct ModConvAttributes
{
    bool demodulate{true};
    int32_t up{1};
    Activation act{Activation::kLINEAR};
    float alpha{0.2F};
    float gain{1.0F};   //!< already resolved (sqrt(2) for lrelu by default): never "default" here
    float clamp{-1.0F}; //!< < 0 means no clamp
    int32_t filterSize{0};
    float filter[kMAX_FILTER_SIZE * kMAX_FILTER_SIZE]{}; //!< row-major [filterSize, filterSize], sum 1
    //! fp16 only: run the GEMM on tensor cores (WMMA, fp32 accumulation). false forces the fp32 SIMT kernel.
    //! An implementation choice, not a layer attribute: never serialised.
    bool tensorCores{true};
};

//! Sizes of one call. Output is [batch, outChannels, height * up, width * up].
struct ModConvShape
{
    int32_t batch{0};
    int32_t inChannels{0};
    int32_t outChannels{0};
    int32_t height{0};
    int32_t width{0};
    int32_t kernelSize{0};
    int32_t noiseBatch{0}; //!< 0: no noise, 1: one noise image broadcast over the batch, batch: one per sample
    bool hasBias{false};
    bool hasSkip{false};
};

//! Device pointers (host pointers in the CPU emulation). All tensors are dense NCHW in the call's DataKind.
struct ModConvTensors
{
    void const* x{nullptr};       //!< [N, I, H, W]
    void const* weight{nullptr};  //!< [O, I, k, k]
    void const* styles{nullptr};  //!< [N, I]
    void const* noise{nullptr};   //!< [noiseBatch, 1, H*up, W*up] or nullptr
    void const* bias{nullptr};    //!< [O] or nullptr
    void const* skip{nullptr};    //!< [N, O, H*up/2, W*up/2] or nullptr
    float const* filterDevice{nullptr}; //!< optional float32 device copy of the filter; else attributes.filter
    void* out{nullptr};           //!< [N, O, H*up, W*up]
};

//! Empty when the attributes alone are valid, else a one-line reason.
std::string validateModConvAttributes(ModConvAttributes const& attrs);

//! Empty when shape and attributes are consistent, else a one-line reason.
std::string validateModConv(ModConvShape const& shape, ModConvAttributes const& attrs);

//! Bytes of scratch memory enqueueModulatedConv2d needs (256-byte aligned pieces); valid for any smaller batch.
size_t modConvWorkspaceSize(ModConvShape const& shape, ModConvAttributes const& attrs);

//! Launch the whole layer on `stream`. Returns 0 on success, a CUDA error code (or -1 for invalid arguments)
//! otherwise; never synchronises.
int32_t enqueueModulatedConv2d(DataKind kind, ModConvShape const& shape, ModConvAttributes const& attrs,
    ModConvTensors const& tensors, void* workspace, StreamHandle stream);

//! Padding before the blur of the up = 2 path (the reference's _up2_padding p0), for kernel size k and filter f.
int32_t up2BlurPadding(int32_t kernelSize, int32_t filterSize);

} // namespace stylecast
