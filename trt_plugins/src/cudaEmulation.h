/*
 * A CPU emulation of the small part of CUDA the kernels use, so the exact kernel source runs in CI without a GPU.
 *
 * Each block runs its threads as cooperative fibers (ucontext) on one OS thread: a thread runs until it reaches
 * __syncthreads() or returns, then the next one runs. That schedule is adversarial for shared-memory races: a
 * missing barrier makes a thread read a tile its neighbours have not written yet (or overwrite one they have not
 * read), so the numbers come out wrong instead of silently right. Blocks run one after another; __shared__
 * variables become function statics, which is exactly "one copy per block" when blocks never overlap.
 * Warp-level intrinsics are deliberately absent: the kernels must not use them.
 */
#pragma once

#if !defined(STYLECAST_EMULATE)
#error "cudaEmulation.h is only for the CPU emulation build"
#endif

#include <cuda_fp16.h> // host implementations of __half conversions

#include <cmath>
#include <cstdint>
#include <functional>
#include <type_traits>

#undef __global__
#undef __shared__
#undef __forceinline__
#define __global__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(...)

namespace stylecast
{
namespace emu
{

extern dim3 gThreadIdx;
extern dim3 gBlockIdx;
extern dim3 gBlockDim;
extern dim3 gGridDim;

//! Yield to the block scheduler until every thread of the block has arrived.
void syncThreads();

//! Run `body` once per thread of every block of `grid`, with the CUDA built-ins set for each.
void launch(dim3 grid, dim3 block, std::function<void()> const& body);

//! Number of __syncthreads() that were reached by only part of a block (must stay 0).
int64_t divergentBarrierCount();

//! Broken API preconditions (e.g. a misaligned WMMA pointer): counted, never fatal, must stay 0.
void recordViolation(char const* what);
int64_t violationCount();
char const* lastViolation();

} // namespace emu
} // namespace stylecast

//! Minimal nvcuda::wmma for 16x16x16 half -> float tiles. Every lane holds the whole tile (the real per-lane
//! layout is opaque to correct code anyway), so results equal the hardware's up to fp32 summation order. The
//! documented preconditions are enforced: 256-bit aligned pointers and ldm a multiple of 16 bytes.
namespace nvcuda
{
namespace wmma
{
struct matrix_a
{
};
struct matrix_b
{
};
struct accumulator
{
};
struct row_major
{
};
enum layout_t
{
    mem_row_major,
    mem_col_major
};

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment
{
    static_assert(M == 16 && N == 16 && K == 16, "the emulation only knows 16x16x16 tiles");
    float x[256];
};

namespace detail
{
void failPrecondition(char const* what);

template <typename T>
inline void checkPointer(T const* ptr, unsigned ldm)
{
    if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0)
    {
        failPrecondition("wmma pointer is not 256-bit aligned");
    }
    if ((ldm * sizeof(T)) % 16 != 0)
    {
        failPrecondition("wmma ldm is not a multiple of 16 bytes");
    }
}
} // namespace detail

template <typename Use, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, __half, Layout>& frag, __half const* ptr, unsigned ldm)
{
    static_assert(std::is_same<Layout, row_major>::value, "the emulation only knows row-major operands");
    detail::checkPointer(ptr, ldm);
    for (int r = 0; r < 16; ++r)
    {
        for (int c = 0; c < 16; ++c)
        {
            frag.x[r * 16 + c] = __half2float(ptr[r * ldm + c]);
        }
    }
}

inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& frag, float value)
{
    for (float& v : frag.x)
    {
        v = value;
    }
}

inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
    fragment<matrix_a, 16, 16, 16, __half, row_major> const& a,
    fragment<matrix_b, 16, 16, 16, __half, row_major> const& b,
    fragment<accumulator, 16, 16, 16, float> const& c)
{
    float out[256];
    for (int r = 0; r < 16; ++r)
    {
        for (int col = 0; col < 16; ++col)
        {
            float acc = c.x[r * 16 + col];
            for (int k = 0; k < 16; ++k)
            {
                acc += a.x[r * 16 + k] * b.x[k * 16 + col];
            }
            out[r * 16 + col] = acc;
        }
    }
    for (int i = 0; i < 256; ++i)
    {
        d.x[i] = out[i];
    }
}

inline void store_matrix_sync(float* ptr, fragment<accumulator, 16, 16, 16, float> const& frag, unsigned ldm,
    layout_t layout)
{
    detail::checkPointer(ptr, ldm);
    if (layout != mem_row_major)
    {
        detail::failPrecondition("the emulation only stores row-major");
    }
    for (int r = 0; r < 16; ++r)
    {
        for (int c = 0; c < 16; ++c)
        {
            ptr[r * ldm + c] = frag.x[r * 16 + c];
        }
    }
}
} // namespace wmma
} // namespace nvcuda

#define threadIdx (::stylecast::emu::gThreadIdx)
#define blockIdx (::stylecast::emu::gBlockIdx)
#define blockDim (::stylecast::emu::gBlockDim)
#define gridDim (::stylecast::emu::gGridDim)
#define __syncthreads() ::stylecast::emu::syncThreads()

inline float rsqrtf(float v)
{
    return 1.0F / std::sqrt(v);
}
