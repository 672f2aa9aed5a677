/*
 * The CUDA kernel source compiled as plain C++ for the CPU emulation (CI without a GPU); see cudaEmulation.h.
 */
#include "modulatedConv2dKernels.cu"
