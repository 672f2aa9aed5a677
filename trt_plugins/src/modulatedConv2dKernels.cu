/*
 * CUDA kernels of the StyleGAN2 modulated convolution (Karras et al., 2020), shared by the TensorRT plugin and the
 * PyTorch extension. training/ops/modulated_conv2d.py is the specification.
 *
 * Plan of one call (all accumulation in float32, whatever the I/O type):
 *   1. demodulation (if enabled): wsq[o, i] = sum_taps weight^2, then demod[n, o] = rsqrt(sum_i styles^2 wsq + eps).
 *      This is the weight-space form of the reference's per-sample kernel norm; it never builds per-sample kernels.
 *   2. the convolution as an implicit GEMM: M = output channels, N = output pixels of one sample, K = I * taps.
 *      Activations are modulated (x * styles[n, i]) while they are staged into shared memory, so the weight stays
 *      one tensor shared by the whole batch (dynamic batch, no grouped conv).
 *        up = 1: a 'same' correlation; the epilogue (demod, noise, bias, act * gain, clamp, skip) runs in registers.
 *        up = 2: the stride-2 transposed conv split into its 4 output phases (each phase only visits the kernel taps
 *                of its parity, so no multiply hits an inserted zero); results go to a float32 scratch image,
 *                then a second kernel applies the 4x4 blur and the same epilogue.
 *      Folding the blur into per-phase 3x3 kernels was rejected: it costs 4x the MACs of the transposed conv.
 *   3. to-RGB (k = 1, up = 1, O <= 4) skips the GEMM tiling, whose 64-row tiles would be 95% empty: one thread per
 *      pixel keeps all output channels in registers and adds the upsampled skip image in its epilogue.
 *
 * The same source compiles as plain C++ with STYLECAST_EMULATE for the CPU emulation used in CI (cudaEmulation.h);
 * so: no warp intrinsics, every launch goes through launchKernel().
 */
#include "stylecast/modulatedConv2d.h"

#if defined(STYLECAST_EMULATE)
#include "cudaEmulation.h"
#else
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700
#error "stylecast kernels need sm_70 or newer (WMMA tensor cores); build for sm_80/sm_90"
#endif
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <type_traits>

namespace stylecast
{
namespace
{

// ---------------------------------------------------------------------------------------------------------------
// Launch and type helpers
// ---------------------------------------------------------------------------------------------------------------

//! Launch one kernel and return its launch status (0 or a cudaError_t). Every launch is checked on its own:
//! a later kernel must never run on the unwritten output of one that failed to launch.
template <typename... KernelArgs, typename... Args>
[[nodiscard]] int32_t launchKernel(
    void (*kernel)(KernelArgs...), dim3 grid, dim3 block, StreamHandle stream, Args const&... args)
{
#if defined(STYLECAST_EMULATE)
    (void) stream;
    ::stylecast::emu::launch(grid, block, [&]() { kernel(args...); });
    return 0;
#else
    kernel<<<grid, block, 0, stream>>>(args...);
    return static_cast<int32_t>(cudaGetLastError());
#endif
}

__device__ __forceinline__ float toFloat(float v)
{
    return v;
}

__device__ __forceinline__ float toFloat(__half v)
{
    return __half2float(v);
}

template <typename T>
__device__ __forceinline__ T fromFloat(float v);

template <>
__device__ __forceinline__ float fromFloat<float>(float v)
{
    return v;
}

template <>
__device__ __forceinline__ __half fromFloat<__half>(float v)
{
    return __float2half_rn(v);
}

constexpr int32_t kMAX_TAPS = kMAX_FILTER_SIZE * kMAX_FILTER_SIZE;

int32_t floorDiv(int32_t a, int32_t b)
{
    int32_t q = a / b;
    return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

size_t alignUp(size_t bytes)
{
    constexpr size_t kALIGN = 256;
    return (bytes + kALIGN - 1) / kALIGN * kALIGN;
}

// ---------------------------------------------------------------------------------------------------------------
// Shared epilogue: demod, noise, bias, activation * gain, clamp, + upsampled skip (the reference's order)
// ---------------------------------------------------------------------------------------------------------------

template <typename T>
struct EpilogueParams
{
    float const* demod;        //!< [N, O] or nullptr
    T const* noise;            //!< [1 or N, 1, outH, outW] or nullptr
    int32_t noisePerSample;    //!< 1 if noise has one image per sample
    T const* bias;             //!< [O] or nullptr
    T const* skip;             //!< [N, O, outH / 2, outW / 2] or nullptr
    int32_t act;               //!< Activation
    float alpha;
    float gain;
    float clamp;               //!< < 0: none
    int32_t outChannels;
    int32_t outH;
    int32_t outW;
    T* out;                    //!< [N, O, outH, outW]
};

//! FIR taps as the kernels want them: flipped (the reference convolves, it does not correlate) and times 4 (the
//! gain of a x2 upsampling in 2D keeps the image's brightness).
struct FilterParams
{
    float const* device; //!< raw [f, f] float32 filter in device memory, or nullptr to use `taps`
    int32_t size;
    float taps[kMAX_TAPS]; //!< raw [f, f] filter by value
};

//! Load the flipped, x4 filter into shared memory; every thread of the block must call it (it synchronises).
__device__ __forceinline__ void loadFilter(FilterParams const& fp, float* sFilter)
{
    int32_t const count = fp.size * fp.size;
    for (int32_t idx = threadIdx.x; idx < count; idx += blockDim.x)
    {
        int32_t const a = idx / fp.size;
        int32_t const b = idx - a * fp.size;
        int32_t const src = (fp.size - 1 - a) * fp.size + (fp.size - 1 - b);
        float const raw = fp.device != nullptr ? fp.device[src] : fp.taps[src];
        sFilter[idx] = 4.0F * raw;
    }
    __syncthreads();
}

//! upsample2d(skip) at one output pixel: zero insertion x2, padding (f + 1) / 2 in front, flipped filter * 4.
template <typename T>
__device__ __forceinline__ float upsampledSkip(
    T const* skipImage, int32_t skipH, int32_t skipW, int32_t y, int32_t x, float const* sFilter, int32_t f)
{
    int32_t const pad = (f + 1) / 2;
    float acc = 0.0F;
    for (int32_t a = 0; a < f; ++a)
    {
        int32_t const yz = y + a - pad;
        // Only even positions of the zero-inserted image hold samples.
        if (yz < 0 || (yz & 1) != 0 || (yz >> 1) >= skipH)
        {
            continue;
        }
        for (int32_t b = 0; b < f; ++b)
        {
            int32_t const xz = x + b - pad;
            if (xz < 0 || (xz & 1) != 0 || (xz >> 1) >= skipW)
            {
                continue;
            }
            acc += sFilter[a * f + b] * toFloat(skipImage[(yz >> 1) * skipW + (xz >> 1)]);
        }
    }
    return acc;
}

template <typename T>
__device__ __forceinline__ void applyEpilogue(EpilogueParams<T> const& ep, float v, int32_t n, int32_t o, int32_t y,
    int32_t x, float const* sFilter, int32_t filterSize)
{
    int64_t const plane = static_cast<int64_t>(ep.outH) * ep.outW;
    int64_t const pixel = static_cast<int64_t>(y) * ep.outW + x;
    if (ep.demod != nullptr)
    {
        v *= ep.demod[static_cast<int64_t>(n) * ep.outChannels + o];
    }
    if (ep.noise != nullptr)
    {
        v += toFloat(ep.noise[(ep.noisePerSample ? n : 0) * plane + pixel]);
    }
    if (ep.bias != nullptr)
    {
        v += toFloat(ep.bias[o]);
    }
    if (ep.act == static_cast<int32_t>(Activation::kLRELU))
    {
        v = v < 0.0F ? v * ep.alpha : v;
    }
    v *= ep.gain;
    if (ep.clamp >= 0.0F)
    {
        v = fminf(fmaxf(v, -ep.clamp), ep.clamp);
    }
    if (ep.skip != nullptr)
    {
        int32_t const skipH = ep.outH / 2;
        int32_t const skipW = ep.outW / 2;
        T const* skipImage = ep.skip + (static_cast<int64_t>(n) * ep.outChannels + o) * skipH * skipW;
        v += upsampledSkip(skipImage, skipH, skipW, y, x, sFilter, filterSize);
    }
    ep.out[(static_cast<int64_t>(n) * ep.outChannels + o) * plane + pixel] = fromFloat<T>(v);
}

// ---------------------------------------------------------------------------------------------------------------
// 1. Demodulation coefficients (float32 always: 512 * 9 squared terms overflow fp16)
// ---------------------------------------------------------------------------------------------------------------

constexpr int32_t kREDUCE_THREADS = 256;

//! wsq[o, i] = sum over the k x k taps of weight[o, i]^2.
template <typename T>
__global__ void __launch_bounds__(kREDUCE_THREADS) weightSquareKernel(
    T const* weight, float* wsq, int32_t count, int32_t taps)
{
    for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < count;
         idx += static_cast<int64_t>(gridDim.x) * blockDim.x)
    {
        float acc = 0.0F;
        for (int32_t t = 0; t < taps; ++t)
        {
            float const w = toFloat(weight[idx * taps + t]);
            acc += w * w;
        }
        wsq[idx] = acc;
    }
}

//! demod[n, o] = rsqrt(sum_i styles[n, i]^2 * wsq[o, i] + eps); one block per output channel, a tree reduction.
template <typename T>
__global__ void __launch_bounds__(kREDUCE_THREADS) demodKernel(
    T const* styles, float const* wsq, float* demod, int32_t batch, int32_t inChannels, int32_t outChannels)
{
    __shared__ float sPartial[kREDUCE_THREADS];
    int32_t const o = blockIdx.x;
    float const* wsqRow = wsq + static_cast<int64_t>(o) * inChannels;
    for (int32_t n = 0; n < batch; ++n)
    {
        T const* s = styles + static_cast<int64_t>(n) * inChannels;
        float acc = 0.0F;
        for (int32_t i = threadIdx.x; i < inChannels; i += kREDUCE_THREADS)
        {
            float const sv = toFloat(s[i]);
            acc += sv * sv * wsqRow[i];
        }
        sPartial[threadIdx.x] = acc;
        __syncthreads();
        for (int32_t stride = kREDUCE_THREADS / 2; stride > 0; stride >>= 1)
        {
            if (static_cast<int32_t>(threadIdx.x) < stride)
            {
                sPartial[threadIdx.x] += sPartial[threadIdx.x + stride];
            }
            __syncthreads();
        }
        if (threadIdx.x == 0)
        {
            demod[static_cast<int64_t>(n) * outChannels + o] = rsqrtf(sPartial[0] + kDEMOD_EPS);
        }
        // sPartial[0] is read above before the next sample's first write.
        __syncthreads();
    }
}

// ---------------------------------------------------------------------------------------------------------------
// 2. Implicit-GEMM convolution
// ---------------------------------------------------------------------------------------------------------------

constexpr int32_t kTILE_M = 64; //!< output channels per block
constexpr int32_t kTILE_N = 64; //!< output pixels per block
constexpr int32_t kTILE_K = 16; //!< reduction slice staged per step
constexpr int32_t kCONV_THREADS = 256;
constexpr int32_t kMICRO = 4;   //!< each thread owns a 4 x 4 block of the 64 x 64 tile
// One sub-tile per 4 rows; the +4 padding keeps rows 16-byte aligned and staggers banks between rows.
constexpr int32_t kSMEM_STRIDE = kTILE_M + 4;

static_assert(kTILE_M == kTILE_N, "loader index math assumes square tiles");
static_assert(kCONV_THREADS == (kTILE_M / kMICRO) * (kTILE_N / kMICRO), "one thread per micro-tile");
static_assert(kTILE_M * kTILE_K == kCONV_THREADS * 4 && kTILE_N * kTILE_K == kCONV_THREADS * 4, "4 loads/thread");

//! One output phase of the convolution. For output position (m, q) of the phase and tap (j, l):
//!   input row  h = m + inOffH + tapStep * j,     kernel row kh = kernelOffH + kernelStep * j
//!   output row Y = m * dstStride + dstOffH      (same for columns)
struct ConvPhase
{
    int32_t outH;
    int32_t outW;
    int32_t tapsH;
    int32_t tapsW;
    int32_t kernelOffH;
    int32_t kernelOffW;
    int32_t inOffH;
    int32_t inOffW;
    int32_t dstOffH;
    int32_t dstOffW;
};

template <typename T>
struct ConvParams
{
    T const* x;
    T const* weight;
    T const* styles;
    int32_t inChannels;
    int32_t outChannels;
    int32_t height;
    int32_t width;
    int32_t kernelSize;
    int32_t kernelStep; //!< 1 for up = 1, 2 for the polyphase transposed conv
    int32_t tapStep;    //!< +1 correlation, -1 transposed convolution
    int32_t dstStride;  //!< 1 or 2
    int32_t numPhases;
    ConvPhase phase[4];
    float* raw;         //!< up = 2: [N, O, dstH, dstW] float32 scratch (written unscaled)
    int32_t dstH;
    int32_t dstW;
};

//! kRAW: write the accumulator to the float32 scratch image (up = 2), else run the fused epilogue (up = 1).
template <typename T, bool kRAW>
__global__ void __launch_bounds__(kCONV_THREADS) convKernel(
    ConvParams<T> p, EpilogueParams<T> ep, FilterParams fp)
{
    __shared__ float sA[kTILE_K][kSMEM_STRIDE]; // weights, [k][o]
    __shared__ float sB[kTILE_K][kSMEM_STRIDE]; // modulated activations, [k][pixel]
    __shared__ float sFilter[kMAX_TAPS];

    int32_t const tid = threadIdx.x;
    int32_t const n = blockIdx.z / p.numPhases;
    ConvPhase const cp = p.phase[blockIdx.z - n * p.numPhases];
    int32_t const numPixels = cp.outH * cp.outW;
    int32_t const pixel0 = blockIdx.x * kTILE_N;
    if (pixel0 >= numPixels)
    {
        return; // the grid is sized for the largest phase; uniform per block, before any barrier
    }
    int32_t const o0 = blockIdx.y * kTILE_M;
    int32_t const taps = cp.tapsH * cp.tapsW;
    int32_t const kTotal = p.inChannels * taps;

    if (!kRAW && ep.skip != nullptr)
    {
        loadFilter(fp, sFilter);
    }

    // Activation loader: each thread always stages the same pixel column (256 threads, 64 columns) and the
    // reduction rows bRow0, bRow0 + 4, ..., so the pixel -> (m, q) division happens once.
    int32_t const bCol = tid % kTILE_N;
    int32_t const bRow0 = tid / kTILE_N;
    int32_t const bPixel = pixel0 + bCol;
    bool const bPixelOk = bPixel < numPixels;
    int32_t const bM = bPixelOk ? bPixel / cp.outW : 0;
    int32_t const bQ = bPixelOk ? bPixel - bM * cp.outW : 0;
    int32_t const bBaseH = bM + cp.inOffH;
    int32_t const bBaseW = bQ + cp.inOffW;
    int64_t const plane = static_cast<int64_t>(p.height) * p.width;
    T const* xSample = p.x + static_cast<int64_t>(n) * p.inChannels * plane;
    T const* sSample = p.styles + static_cast<int64_t>(n) * p.inChannels;

    // Weight loader: consecutive threads walk consecutive reduction indices of one output channel (coalesced).
    int32_t const aCol = tid % kTILE_K;
    int32_t const aRow0 = tid / kTILE_K;
    int32_t const kk2 = p.kernelSize * p.kernelSize;

    float aReg[4];
    float bReg[4];

    auto loadGlobal = [&](int32_t k0) {
        {
            int32_t const kk = k0 + aCol;
            bool const kOk = kk < kTotal;
            int32_t i = 0;
            int32_t kh = 0;
            int32_t kw = 0;
            if (kOk)
            {
                i = kk / taps;
                int32_t const r = kk - i * taps;
                int32_t const j = r / cp.tapsW;
                int32_t const l = r - j * cp.tapsW;
                kh = cp.kernelOffH + p.kernelStep * j;
                kw = cp.kernelOffW + p.kernelStep * l;
            }
#pragma unroll
            for (int32_t e = 0; e < 4; ++e)
            {
                int32_t const o = o0 + aRow0 + 16 * e;
                aReg[e] = (kOk && o < p.outChannels)
                    ? toFloat(p.weight[(static_cast<int64_t>(o) * p.inChannels + i) * kk2 + kh * p.kernelSize + kw])
                    : 0.0F;
            }
        }
#pragma unroll
        for (int32_t e = 0; e < 4; ++e)
        {
            int32_t const kk = k0 + bRow0 + 4 * e;
            float v = 0.0F;
            if (bPixelOk && kk < kTotal)
            {
                int32_t const i = kk / taps;
                int32_t const r = kk - i * taps;
                int32_t const j = r / cp.tapsW;
                int32_t const l = r - j * cp.tapsW;
                int32_t const h = bBaseH + p.tapStep * j;
                int32_t const w = bBaseW + p.tapStep * l;
                if (h >= 0 && h < p.height && w >= 0 && w < p.width)
                {
                    // Modulate on load: x * styles[n, i] (the reference's activation-scaling form).
                    v = toFloat(xSample[i * plane + static_cast<int64_t>(h) * p.width + w]) * toFloat(sSample[i]);
                }
            }
            bReg[e] = v;
        }
    };

    auto storeShared = [&]() {
#pragma unroll
        for (int32_t e = 0; e < 4; ++e)
        {
            sA[aCol][aRow0 + 16 * e] = aReg[e];
            sB[bRow0 + 4 * e][bCol] = bReg[e];
        }
    };

    int32_t const ty = tid / (kTILE_N / kMICRO);
    int32_t const tx = tid - ty * (kTILE_N / kMICRO);
    float acc[kMICRO][kMICRO];
#pragma unroll
    for (int32_t r = 0; r < kMICRO; ++r)
    {
#pragma unroll
        for (int32_t c = 0; c < kMICRO; ++c)
        {
            acc[r][c] = 0.0F;
        }
    }

    loadGlobal(0);
    storeShared();
    __syncthreads();
    for (int32_t k0 = 0; k0 < kTotal; k0 += kTILE_K)
    {
        bool const hasNext = k0 + kTILE_K < kTotal;
        if (hasNext)
        {
            loadGlobal(k0 + kTILE_K); // global loads in flight while this slice is multiplied
        }
#pragma unroll
        for (int32_t kq = 0; kq < kTILE_K; ++kq)
        {
            float a[kMICRO];
            float b[kMICRO];
#pragma unroll
            for (int32_t r = 0; r < kMICRO; ++r)
            {
                a[r] = sA[kq][ty * kMICRO + r];
                b[r] = sB[kq][tx * kMICRO + r];
            }
#pragma unroll
            for (int32_t r = 0; r < kMICRO; ++r)
            {
#pragma unroll
                for (int32_t c = 0; c < kMICRO; ++c)
                {
                    acc[r][c] = fmaf(a[r], b[c], acc[r][c]);
                }
            }
        }
        __syncthreads();
        if (hasNext)
        {
            storeShared();
        }
        __syncthreads();
    }

    // Epilogue straight from registers.
#pragma unroll
    for (int32_t r = 0; r < kMICRO; ++r)
    {
        int32_t const o = o0 + ty * kMICRO + r;
        if (o >= p.outChannels)
        {
            continue;
        }
#pragma unroll
        for (int32_t c = 0; c < kMICRO; ++c)
        {
            int32_t const pixel = pixel0 + tx * kMICRO + c;
            if (pixel >= numPixels)
            {
                continue;
            }
            int32_t const m = pixel / cp.outW;
            int32_t const q = pixel - m * cp.outW;
            int32_t const y = m * p.dstStride + cp.dstOffH;
            int32_t const x = q * p.dstStride + cp.dstOffW;
            if (kRAW)
            {
                p.raw[((static_cast<int64_t>(n) * p.outChannels + o) * p.dstH + y) * p.dstW + x] = acc[r][c];
            }
            else
            {
                applyEpilogue(ep, acc[r][c], n, o, y, x, sFilter, fp.size);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// 2a. The same implicit GEMM on tensor cores for fp16 I/O (WMMA 16x16x16, fp32 accumulation)
// ---------------------------------------------------------------------------------------------------------------
// Operands are rounded to fp16 exactly where the reference rounds them: the weight is fp16 already and
// x * styles is one fp16 multiply in the reference (the fp32 product of two fp16 values is exact, so rounding it
// once gives the same bits). Products are exact in the MMA and sums stay fp32, like cuDNN's fp16 convolution.

constexpr int32_t kWMMA_TILE_K = 32;                  //!< two 16-deep MMA steps per staged slice
constexpr int32_t kWMMA_A_STRIDE = kWMMA_TILE_K + 8;  //!< halves; 80-byte rows keep fragment pointers 32-B aligned
constexpr int32_t kWMMA_B_STRIDE = kTILE_N + 8;       //!< halves; 144-byte rows
constexpr int32_t kWMMA_C_STRIDE = kTILE_N + 4;       //!< floats; 272-byte rows
constexpr int32_t kWMMA_LOADS = 8;                    //!< A and B elements staged per thread per slice
static_assert(kTILE_M * kWMMA_TILE_K == kCONV_THREADS * kWMMA_LOADS, "A loader covers the tile");
static_assert(kWMMA_TILE_K * kTILE_N == kCONV_THREADS * kWMMA_LOADS, "B loader covers the tile");

//! 8 warps: warp w owns rows 16 * (w / 2) .. +16 and columns 32 * (w % 2) .. +32 (two accumulator tiles).
template <bool kRAW>
__global__ void __launch_bounds__(kCONV_THREADS) convKernelWmma(
    ConvParams<__half> p, EpilogueParams<__half> ep, FilterParams fp)
{
    namespace wmma = nvcuda::wmma;
    __shared__ __align__(32) __half sA[kTILE_M][kWMMA_A_STRIDE];       // weights, [o][k]
    __shared__ __align__(32) __half sB[kWMMA_TILE_K][kWMMA_B_STRIDE];  // modulated activations, [k][pixel]
    __shared__ __align__(32) float sC[kTILE_M][kWMMA_C_STRIDE];        // accumulators for the epilogue
    __shared__ float sFilter[kMAX_TAPS];

    int32_t const tid = threadIdx.x;
    int32_t const n = blockIdx.z / p.numPhases;
    ConvPhase const cp = p.phase[blockIdx.z - n * p.numPhases];
    int32_t const numPixels = cp.outH * cp.outW;
    int32_t const pixel0 = blockIdx.x * kTILE_N;
    if (pixel0 >= numPixels)
    {
        return; // uniform per block, before any barrier
    }
    int32_t const o0 = blockIdx.y * kTILE_M;
    int32_t const taps = cp.tapsH * cp.tapsW;
    int32_t const kTotal = p.inChannels * taps;

    if (!kRAW && ep.skip != nullptr)
    {
        loadFilter(fp, sFilter);
    }

    int32_t const bCol = tid % kTILE_N;
    int32_t const bRow0 = tid / kTILE_N; // rows bRow0 + 4e
    int32_t const bPixel = pixel0 + bCol;
    bool const bPixelOk = bPixel < numPixels;
    int32_t const bM = bPixelOk ? bPixel / cp.outW : 0;
    int32_t const bQ = bPixelOk ? bPixel - bM * cp.outW : 0;
    int32_t const bBaseH = bM + cp.inOffH;
    int32_t const bBaseW = bQ + cp.inOffW;
    int64_t const plane = static_cast<int64_t>(p.height) * p.width;
    __half const* xSample = p.x + static_cast<int64_t>(n) * p.inChannels * plane;
    __half const* sSample = p.styles + static_cast<int64_t>(n) * p.inChannels;

    int32_t const aCol = tid % kWMMA_TILE_K;
    int32_t const aRow0 = tid / kWMMA_TILE_K; // rows aRow0 + 8e
    int32_t const kk2 = p.kernelSize * p.kernelSize;
    __half const zero = __float2half_rn(0.0F);

    __half aReg[kWMMA_LOADS];
    __half bReg[kWMMA_LOADS];

    auto loadGlobal = [&](int32_t k0) {
        {
            int32_t const kk = k0 + aCol;
            bool const kOk = kk < kTotal;
            int32_t i = 0;
            int32_t kh = 0;
            int32_t kw = 0;
            if (kOk)
            {
                i = kk / taps;
                int32_t const r = kk - i * taps;
                int32_t const j = r / cp.tapsW;
                int32_t const l = r - j * cp.tapsW;
                kh = cp.kernelOffH + p.kernelStep * j;
                kw = cp.kernelOffW + p.kernelStep * l;
            }
#pragma unroll
            for (int32_t e = 0; e < kWMMA_LOADS; ++e)
            {
                int32_t const o = o0 + aRow0 + 8 * e;
                aReg[e] = (kOk && o < p.outChannels)
                    ? p.weight[(static_cast<int64_t>(o) * p.inChannels + i) * kk2 + kh * p.kernelSize + kw]
                    : zero;
            }
        }
#pragma unroll
        for (int32_t e = 0; e < kWMMA_LOADS; ++e)
        {
            int32_t const kk = k0 + bRow0 + 4 * e;
            __half v = zero;
            if (bPixelOk && kk < kTotal)
            {
                int32_t const i = kk / taps;
                int32_t const r = kk - i * taps;
                int32_t const j = r / cp.tapsW;
                int32_t const l = r - j * cp.tapsW;
                int32_t const h = bBaseH + p.tapStep * j;
                int32_t const w = bBaseW + p.tapStep * l;
                if (h >= 0 && h < p.height && w >= 0 && w < p.width)
                {
                    v = __float2half_rn(toFloat(xSample[i * plane + static_cast<int64_t>(h) * p.width + w])
                        * toFloat(sSample[i]));
                }
            }
            bReg[e] = v;
        }
    };

    auto storeShared = [&]() {
#pragma unroll
        for (int32_t e = 0; e < kWMMA_LOADS; ++e)
        {
            sA[aRow0 + 8 * e][aCol] = aReg[e];
            sB[bRow0 + 4 * e][bCol] = bReg[e];
        }
    };

    int32_t const warp = tid / 32;
    int32_t const warpRow = 16 * (warp / 2);
    int32_t const warpCol = 32 * (warp % 2);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
    wmma::fill_fragment(acc[0], 0.0F);
    wmma::fill_fragment(acc[1], 0.0F);

    loadGlobal(0);
    storeShared();
    __syncthreads();
    for (int32_t k0 = 0; k0 < kTotal; k0 += kWMMA_TILE_K)
    {
        bool const hasNext = k0 + kWMMA_TILE_K < kTotal;
        if (hasNext)
        {
            loadGlobal(k0 + kWMMA_TILE_K);
        }
#pragma unroll
        for (int32_t kq = 0; kq < kWMMA_TILE_K; kq += 16)
        {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
            wmma::load_matrix_sync(a, &sA[warpRow][kq], kWMMA_A_STRIDE);
#pragma unroll
            for (int32_t j = 0; j < 2; ++j)
            {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> b;
                wmma::load_matrix_sync(b, &sB[kq][warpCol + 16 * j], kWMMA_B_STRIDE);
                wmma::mma_sync(acc[j], a, b, acc[j]);
            }
        }
        __syncthreads();
        if (hasNext)
        {
            storeShared();
        }
        __syncthreads();
    }
    wmma::store_matrix_sync(&sC[warpRow][warpCol], acc[0], kWMMA_C_STRIDE, wmma::mem_row_major);
    wmma::store_matrix_sync(&sC[warpRow][warpCol + 16], acc[1], kWMMA_C_STRIDE, wmma::mem_row_major);
    __syncthreads();

    // Epilogue from shared memory; consecutive threads take consecutive pixels (coalesced stores).
    for (int32_t idx = tid; idx < kTILE_M * kTILE_N; idx += kCONV_THREADS)
    {
        int32_t const row = idx / kTILE_N;
        int32_t const col = idx - row * kTILE_N;
        int32_t const o = o0 + row;
        int32_t const pixel = pixel0 + col;
        if (o >= p.outChannels || pixel >= numPixels)
        {
            continue;
        }
        int32_t const m = pixel / cp.outW;
        int32_t const q = pixel - m * cp.outW;
        int32_t const y = m * p.dstStride + cp.dstOffH;
        int32_t const x = q * p.dstStride + cp.dstOffW;
        if (kRAW)
        {
            p.raw[((static_cast<int64_t>(n) * p.outChannels + o) * p.dstH + y) * p.dstW + x] = sC[row][col];
        }
        else
        {
            applyEpilogue(ep, sC[row][col], n, o, y, x, sFilter, fp.size);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// 2b. up = 2: blur of the transposed-conv scratch image + epilogue
// ---------------------------------------------------------------------------------------------------------------

constexpr int32_t kPOINTWISE_THREADS = 256;

//! out[y, x] = sum_{a, b} filter'[a, b] * t[y + a - pad, x + b - pad] (t is zero outside), then the epilogue.
template <typename T>
__global__ void __launch_bounds__(kPOINTWISE_THREADS) blurEpilogueKernel(float const* raw, int32_t rawH,
    int32_t rawW, int32_t pad, int32_t batch, EpilogueParams<T> ep, FilterParams fp)
{
    __shared__ float sFilter[kMAX_TAPS];
    loadFilter(fp, sFilter);
    int32_t const f = fp.size;
    int64_t const total = static_cast<int64_t>(batch) * ep.outChannels * ep.outH * ep.outW;
    for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
         idx += static_cast<int64_t>(gridDim.x) * blockDim.x)
    {
        int32_t const x = static_cast<int32_t>(idx % ep.outW);
        int64_t rest = idx / ep.outW;
        int32_t const y = static_cast<int32_t>(rest % ep.outH);
        rest /= ep.outH;
        int32_t const o = static_cast<int32_t>(rest % ep.outChannels);
        int32_t const n = static_cast<int32_t>(rest / ep.outChannels);
        float const* image = raw + (static_cast<int64_t>(n) * ep.outChannels + o) * rawH * rawW;
        float acc = 0.0F;
        for (int32_t a = 0; a < f; ++a)
        {
            int32_t const yy = y + a - pad;
            if (yy < 0 || yy >= rawH)
            {
                continue;
            }
            for (int32_t b = 0; b < f; ++b)
            {
                int32_t const xx = x + b - pad;
                if (xx < 0 || xx >= rawW)
                {
                    continue;
                }
                acc += sFilter[a * f + b] * image[static_cast<int64_t>(yy) * rawW + xx];
            }
        }
        applyEpilogue(ep, acc, n, o, y, x, sFilter, f);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// 3. to-RGB: 1x1 modulated conv with few output channels, one thread per pixel
// ---------------------------------------------------------------------------------------------------------------

constexpr int32_t kRGB_MAX_OUT = 4;
constexpr int32_t kRGB_CHUNK = kPOINTWISE_THREADS; //!< input channels staged per step

template <typename T>
__global__ void __launch_bounds__(kPOINTWISE_THREADS) toRgbKernel(
    T const* x, T const* weight, T const* styles, int32_t inChannels, int32_t numPixels, EpilogueParams<T> ep,
    FilterParams fp)
{
    __shared__ float sWeight[kRGB_MAX_OUT][kRGB_CHUNK]; // weight[o, i] * styles[n, i] for this sample
    __shared__ float sFilter[kMAX_TAPS];
    if (ep.skip != nullptr)
    {
        loadFilter(fp, sFilter);
    }
    int32_t const n = blockIdx.y;
    int32_t const outChannels = ep.outChannels;
    int32_t const pixel = blockIdx.x * kPOINTWISE_THREADS + threadIdx.x;
    bool const pixelOk = pixel < numPixels;
    T const* xSample = x + static_cast<int64_t>(n) * inChannels * numPixels;
    T const* sSample = styles + static_cast<int64_t>(n) * inChannels;

    float acc[kRGB_MAX_OUT] = {0.0F, 0.0F, 0.0F, 0.0F};
    for (int32_t i0 = 0; i0 < inChannels; i0 += kRGB_CHUNK)
    {
        int32_t const chunk = inChannels - i0 < kRGB_CHUNK ? inChannels - i0 : kRGB_CHUNK;
        // Folding the style into the (per-sample) 1x1 weight is exact up to rounding order: x * s * w.
        // Rows o >= outChannels are zero so the unrolled accumulation below never reads garbage.
        for (int32_t idx = threadIdx.x; idx < kRGB_MAX_OUT * kRGB_CHUNK; idx += kPOINTWISE_THREADS)
        {
            int32_t const o = idx / kRGB_CHUNK;
            int32_t const ii = idx - o * kRGB_CHUNK;
            sWeight[o][ii] = (o < outChannels && ii < chunk)
                ? toFloat(weight[static_cast<int64_t>(o) * inChannels + i0 + ii]) * toFloat(sSample[i0 + ii])
                : 0.0F;
        }
        __syncthreads();
        if (pixelOk)
        {
            for (int32_t ii = 0; ii < chunk; ++ii)
            {
                float const v = toFloat(xSample[static_cast<int64_t>(i0 + ii) * numPixels + pixel]);
#pragma unroll
                for (int32_t o = 0; o < kRGB_MAX_OUT; ++o)
                {
                    acc[o] = fmaf(sWeight[o][ii], v, acc[o]);
                }
            }
        }
        __syncthreads();
    }
    if (pixelOk)
    {
        int32_t const y = pixel / ep.outW;
        int32_t const xPos = pixel - y * ep.outW;
        // A compile-time loop bound keeps acc[] in registers (a run-time bound indexes it from local memory).
#pragma unroll
        for (int32_t o = 0; o < kRGB_MAX_OUT; ++o)
        {
            if (o < outChannels)
            {
                applyEpilogue(ep, acc[o], n, o, y, xPos, sFilter, fp.size);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------------------------

struct WorkspaceLayout
{
    size_t wsqOffset{0};
    size_t demodOffset{0};
    size_t rawOffset{0};
    size_t total{0};
};

WorkspaceLayout workspaceLayout(ModConvShape const& s, ModConvAttributes const& attrs)
{
    WorkspaceLayout layout;
    size_t offset = 0;
    if (attrs.demodulate)
    {
        layout.wsqOffset = offset;
        offset += alignUp(sizeof(float) * static_cast<size_t>(s.outChannels) * s.inChannels);
        layout.demodOffset = offset;
        offset += alignUp(sizeof(float) * static_cast<size_t>(s.batch) * s.outChannels);
    }
    if (attrs.up == 2)
    {
        // Scratch of the stride-2 transposed conv: (2H + k - 2) x (2W + k - 2) per channel, float32.
        size_t const rawH = static_cast<size_t>(2 * s.height + s.kernelSize - 2);
        size_t const rawW = static_cast<size_t>(2 * s.width + s.kernelSize - 2);
        layout.rawOffset = offset;
        offset += alignUp(sizeof(float) * static_cast<size_t>(s.batch) * s.outChannels * rawH * rawW);
    }
    layout.total = offset;
    return layout;
}

dim3 pointwiseGrid(int64_t total)
{
    // Grid-stride loops: a capped grid still covers any size.
    int64_t const blocks = std::min<int64_t>((total + kPOINTWISE_THREADS - 1) / kPOINTWISE_THREADS, 65535 * 8);
    return dim3(static_cast<uint32_t>(std::max<int64_t>(blocks, 1)));
}

template <typename T>
int32_t enqueueTyped(ModConvShape const& s, ModConvAttributes const& attrs, ModConvTensors const& t,
    void* workspace, StreamHandle stream)
{
    WorkspaceLayout const layout = workspaceLayout(s, attrs);
    char* ws = static_cast<char*>(workspace);
    T const* x = static_cast<T const*>(t.x);
    T const* weight = static_cast<T const*>(t.weight);
    T const* styles = static_cast<T const*>(t.styles);
    int32_t const k = s.kernelSize;
    int32_t const outH = s.height * attrs.up;
    int32_t const outW = s.width * attrs.up;

    EpilogueParams<T> ep{};
    ep.demod = nullptr;
    if (attrs.demodulate)
    {
        float* wsq = reinterpret_cast<float*>(ws + layout.wsqOffset);
        float* demod = reinterpret_cast<float*>(ws + layout.demodOffset);
        int32_t const count = s.outChannels * s.inChannels;
        int32_t status = launchKernel(weightSquareKernel<T>, pointwiseGrid(count), dim3(kREDUCE_THREADS), stream,
            weight, wsq, count, k * k);
        if (status == 0)
        {
            status = launchKernel(demodKernel<T>, dim3(s.outChannels), dim3(kREDUCE_THREADS), stream, styles,
                static_cast<float const*>(wsq), demod, s.batch, s.inChannels, s.outChannels);
        }
        if (status != 0)
        {
            return status;
        }
        ep.demod = demod;
    }
    ep.noise = static_cast<T const*>(t.noise);
    // A single noise image is broadcast over the batch (the reference's [1, 1, H, W] buffer).
    ep.noisePerSample = s.noiseBatch > 1 ? 1 : 0;
    ep.bias = s.hasBias ? static_cast<T const*>(t.bias) : nullptr;
    ep.skip = s.hasSkip ? static_cast<T const*>(t.skip) : nullptr;
    ep.act = static_cast<int32_t>(attrs.act);
    ep.alpha = attrs.alpha;
    ep.gain = attrs.gain;
    ep.clamp = attrs.clamp;
    ep.outChannels = s.outChannels;
    ep.outH = outH;
    ep.outW = outW;
    ep.out = static_cast<T*>(t.out);
    if (s.noiseBatch == 0)
    {
        ep.noise = nullptr;
    }

    FilterParams fp{};
    fp.device = t.filterDevice;
    fp.size = attrs.filterSize;
    std::copy(attrs.filter, attrs.filter + kMAX_TAPS, fp.taps);

    if (attrs.up == 1 && k == 1 && s.outChannels <= kRGB_MAX_OUT)
    {
        int32_t const numPixels = s.height * s.width;
        dim3 const grid((numPixels + kPOINTWISE_THREADS - 1) / kPOINTWISE_THREADS, s.batch);
        return launchKernel(toRgbKernel<T>, grid, dim3(kPOINTWISE_THREADS), stream, x, weight, styles,
            s.inChannels, numPixels, ep, fp);
    }
    else
    {
        ConvParams<T> p{};
        p.x = x;
        p.weight = weight;
        p.styles = styles;
        p.inChannels = s.inChannels;
        p.outChannels = s.outChannels;
        p.height = s.height;
        p.width = s.width;
        p.kernelSize = k;
        int32_t maxPixels = 0;
        if (attrs.up == 1)
        {
            p.kernelStep = 1;
            p.tapStep = 1;
            p.dstStride = 1;
            p.numPhases = 1;
            p.phase[0] = ConvPhase{s.height, s.width, k, k, 0, 0, -(k / 2), -(k / 2), 0, 0};
            p.dstH = outH;
            p.dstW = outW;
            maxPixels = s.height * s.width;
        }
        else
        {
            // conv_transpose2d(stride 2): t[Y] = sum_{h, kh: 2h + kh = Y} x[h] w[kh]. For Y = 2m + py only the taps
            // kh = py + 2j contribute, from input row h = m - j.
            int32_t const rawH = 2 * s.height + k - 2;
            int32_t const rawW = 2 * s.width + k - 2;
            p.kernelStep = 2;
            p.tapStep = -1;
            p.dstStride = 2;
            p.numPhases = 4;
            p.dstH = rawH;
            p.dstW = rawW;
            p.raw = reinterpret_cast<float*>(ws + layout.rawOffset);
            for (int32_t py = 0; py < 2; ++py)
            {
                for (int32_t px = 0; px < 2; ++px)
                {
                    ConvPhase& cp = p.phase[py * 2 + px];
                    cp.outH = (rawH - py + 1) / 2;
                    cp.outW = (rawW - px + 1) / 2;
                    cp.tapsH = (k - py + 1) / 2;
                    cp.tapsW = (k - px + 1) / 2;
                    cp.kernelOffH = py;
                    cp.kernelOffW = px;
                    cp.inOffH = 0;
                    cp.inOffW = 0;
                    cp.dstOffH = py;
                    cp.dstOffW = px;
                    maxPixels = std::max(maxPixels, cp.outH * cp.outW);
                }
            }
        }
        dim3 const grid((maxPixels + kTILE_N - 1) / kTILE_N, (s.outChannels + kTILE_M - 1) / kTILE_M,
            s.batch * p.numPhases);
        bool tensorCores = false;
        if constexpr (std::is_same<T, __half>::value)
        {
            tensorCores = attrs.tensorCores;
        }
        int32_t status = 0;
        if (attrs.up == 1)
        {
            if constexpr (std::is_same<T, __half>::value)
            {
                if (tensorCores)
                {
                    return launchKernel(convKernelWmma<false>, grid, dim3(kCONV_THREADS), stream, p, ep, fp);
                }
            }
            return launchKernel(convKernel<T, false>, grid, dim3(kCONV_THREADS), stream, p, ep, fp);
        }
        if constexpr (std::is_same<T, __half>::value)
        {
            if (tensorCores)
            {
                status = launchKernel(convKernelWmma<true>, grid, dim3(kCONV_THREADS), stream, p, ep, fp);
            }
        }
        if (!tensorCores)
        {
            status = launchKernel(convKernel<T, true>, grid, dim3(kCONV_THREADS), stream, p, ep, fp);
        }
        if (status != 0)
        {
            return status;
        }
        int64_t const total = static_cast<int64_t>(s.batch) * s.outChannels * outH * outW;
        return launchKernel(blurEpilogueKernel<T>, pointwiseGrid(total), dim3(kPOINTWISE_THREADS), stream,
            static_cast<float const*>(p.raw), p.dstH, p.dstW, up2BlurPadding(k, attrs.filterSize), s.batch, ep, fp);
    }
}

} // namespace

int32_t up2BlurPadding(int32_t kernelSize, int32_t filterSize)
{
    // The reference: p = (f - 2) - (k - 1); p0 = floor((p + 1) / 2) + 1 (Python floor division).
    int32_t const p = (filterSize - 2) - (kernelSize - 1);
    return floorDiv(p + 1, 2) + 1;
}

std::string validateModConvAttributes(ModConvAttributes const& attrs)
{
    std::ostringstream err;
    if (attrs.up != 1 && attrs.up != 2)
    {
        err << "up must be 1 or 2, got " << attrs.up;
    }
    else if (attrs.act != Activation::kLINEAR && attrs.act != Activation::kLRELU)
    {
        err << "act must be 0 (linear) or 1 (lrelu), got " << static_cast<int32_t>(attrs.act);
    }
    else if (!std::isfinite(attrs.gain) || !std::isfinite(attrs.alpha) || std::isnan(attrs.clamp))
    {
        err << "gain, alpha and clamp must be finite numbers";
    }
    else if (attrs.filterSize < 0 || attrs.filterSize > kMAX_FILTER_SIZE)
    {
        err << "filter_size must be in [0, " << kMAX_FILTER_SIZE << "], got " << attrs.filterSize;
    }
    else if (attrs.up == 2 && attrs.filterSize == 0)
    {
        err << "up=2 needs resample_filter";
    }
    return err.str();
}

std::string validateModConv(ModConvShape const& s, ModConvAttributes const& attrs)
{
    std::string const attrError = validateModConvAttributes(attrs);
    if (!attrError.empty())
    {
        return attrError;
    }
    std::ostringstream err;
    if (s.batch < 0 || s.inChannels <= 0 || s.outChannels <= 0 || s.height <= 0 || s.width <= 0)
    {
        err << "sizes must be positive: N=" << s.batch << " I=" << s.inChannels << " O=" << s.outChannels
            << " H=" << s.height << " W=" << s.width;
    }
    else if (s.kernelSize <= 0 || (attrs.up == 1 && s.kernelSize % 2 == 0))
    {
        err << "kernel size must be positive (and odd for up=1 'same' padding), got " << s.kernelSize;
    }
    else if (s.hasSkip && attrs.filterSize == 0)
    {
        err << "skip needs resample_filter";
    }
    else if (s.hasSkip && ((s.height * attrs.up) % 2 != 0 || (s.width * attrs.up) % 2 != 0))
    {
        err << "skip needs an even output size";
    }
    else if (s.noiseBatch != 0 && s.noiseBatch != 1 && s.noiseBatch != s.batch)
    {
        err << "noise batch must be 1 or N=" << s.batch << ", got " << s.noiseBatch;
    }
    else if (s.batch > 65535 / 4)
    {
        err << "batch " << s.batch << " exceeds the kernel grid limit " << 65535 / 4;
    }
    return err.str();
}

size_t modConvWorkspaceSize(ModConvShape const& shape, ModConvAttributes const& attrs)
{
    return workspaceLayout(shape, attrs).total;
}

int32_t enqueueModulatedConv2d(DataKind kind, ModConvShape const& shape, ModConvAttributes const& attrs,
    ModConvTensors const& tensors, void* workspace, StreamHandle stream)
{
    if (!validateModConv(shape, attrs).empty())
    {
        return -1;
    }
    if (shape.batch == 0)
    {
        return 0;
    }
    if (kind == DataKind::kHALF)
    {
        return enqueueTyped<__half>(shape, attrs, tensors, workspace, stream);
    }
    return enqueueTyped<float>(shape, attrs, tensors, workspace, stream);
}

} // namespace stylecast
