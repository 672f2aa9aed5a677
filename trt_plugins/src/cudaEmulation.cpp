/*
 * Fiber scheduler behind cudaEmulation.h (CPU-only test build of the kernels).
 */
#include "cudaEmulation.h"

#include <ucontext.h>

// swapcontext() is declared returns_twice, so GCC warns that loop counters "might be clobbered". They cannot be:
// swapcontext saves and restores the scheduler's full register state, unlike longjmp.
#pragma GCC diagnostic ignored "-Wclobbered"

#include <vector>

namespace stylecast
{
namespace emu
{

dim3 gThreadIdx;
dim3 gBlockIdx;
dim3 gBlockDim;
dim3 gGridDim;

namespace
{

// Generous: kernels keep small register arrays, the epilogue a few more; glibc's printf alone wants ~8 KiB.
constexpr size_t kFIBER_STACK_BYTES = 256 * 1024;

struct Fiber
{
    ucontext_t context{};
    std::vector<char> stack;
    bool finished{false};
};

ucontext_t gSchedulerContext;
Fiber* gCurrentFiber{nullptr};
std::function<void()> const* gBody{nullptr};
int64_t gDivergentBarriers{0};

void fiberEntry()
{
    (*gBody)();
    gCurrentFiber->finished = true;
    // Returning resumes uc_link, the scheduler.
}

} // namespace

void syncThreads()
{
    swapcontext(&gCurrentFiber->context, &gSchedulerContext);
}

int64_t divergentBarrierCount()
{
    return gDivergentBarriers;
}

namespace
{
int64_t gViolations{0};
char const* gLastViolation{""};
} // namespace

void recordViolation(char const* what)
{
    ++gViolations;
    gLastViolation = what;
}

int64_t violationCount()
{
    return gViolations;
}

char const* lastViolation()
{
    return gLastViolation;
}

void launch(dim3 grid, dim3 block, std::function<void()> const& body)
{
    uint32_t const nbThreads = block.x * block.y * block.z;
    std::vector<Fiber> fibers(nbThreads);
    for (auto& fiber : fibers)
    {
        fiber.stack.resize(kFIBER_STACK_BYTES);
    }
    gGridDim = grid;
    gBlockDim = block;
    gBody = &body;
    for (uint32_t bz = 0; bz < grid.z; ++bz)
    {
        for (uint32_t by = 0; by < grid.y; ++by)
        {
            for (uint32_t bx = 0; bx < grid.x; ++bx)
            {
                gBlockIdx = dim3(bx, by, bz);
                for (auto& fiber : fibers)
                {
                    getcontext(&fiber.context);
                    fiber.context.uc_stack.ss_sp = fiber.stack.data();
                    fiber.context.uc_stack.ss_size = fiber.stack.size();
                    fiber.context.uc_link = &gSchedulerContext;
                    fiber.finished = false;
                    makecontext(&fiber.context, fiberEntry, 0);
                }
                // Round-robin until all threads returned; each round ends at one barrier (or the end).
                while (true)
                {
                    uint32_t finishedThisRound = 0;
                    uint32_t waiting = 0;
                    for (uint32_t t = 0; t < nbThreads; ++t)
                    {
                        Fiber& fiber = fibers[t];
                        if (fiber.finished)
                        {
                            continue;
                        }
                        gThreadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
                        gCurrentFiber = &fiber;
                        swapcontext(&gSchedulerContext, &fiber.context);
                        if (fiber.finished)
                        {
                            ++finishedThisRound;
                        }
                        else
                        {
                            ++waiting;
                        }
                    }
                    if (waiting == 0)
                    {
                        break;
                    }
                    if (finishedThisRound != 0)
                    {
                        // Some threads returned while others wait at __syncthreads(): undefined on a GPU.
                        ++gDivergentBarriers;
                    }
                }
            }
        }
    }
    gCurrentFiber = nullptr;
    gBody = nullptr;
}

} // namespace emu
} // namespace stylecast

namespace nvcuda
{
namespace wmma
{
namespace detail
{

void failPrecondition(char const* what)
{
    // Undefined behaviour on the GPU; here it is recorded (and reported by the caller as a failed launch). The
    // emulated access itself stays memory-safe, so the run can finish.
    ::stylecast::emu::recordViolation(what);
}

} // namespace detail
} // namespace wmma
} // namespace nvcuda
