// defines: DSV3_CUDA_CHECK, DSV3_CUBLAS_CHECK, DSV3_CUDA_LAUNCH_CHECK — every CUDA runtime / cuBLAS call of the
// CUDA backend goes through one of these: a failure throws dsv3::Error naming the call, the error and file:line.
// Host-only header (includable from .cpp files compiled by the C++ compiler).
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "core/error.h"

#define DSV3_CUDA_CHECK(expr)                                                                              \
  do {                                                                                                     \
    const cudaError_t dsv3_cu_err_ = (expr);                                                               \
    if (dsv3_cu_err_ != cudaSuccess)                                                                       \
      DSV3_FAIL("CUDA error " << cudaGetErrorName(dsv3_cu_err_) << " (" << cudaGetErrorString(dsv3_cu_err_) \
                              << ") in " #expr);                                                           \
  } while (0)

#define DSV3_CUBLAS_CHECK(expr)                                                                                \
  do {                                                                                                         \
    const cublasStatus_t dsv3_cb_st_ = (expr);                                                                 \
    if (dsv3_cb_st_ != CUBLAS_STATUS_SUCCESS)                                                                  \
      DSV3_FAIL("cuBLAS error " << cublasGetStatusName(dsv3_cb_st_) << " (" << cublasGetStatusString(dsv3_cb_st_) \
                                << ") in " #expr);                                                             \
  } while (0)

// after a <<<...>>> launch: launch-configuration errors (and earlier asynchronous ones) surface here
#define DSV3_CUDA_LAUNCH_CHECK() DSV3_CUDA_CHECK(cudaGetLastError())

namespace dsv3::cuda {

// cuBLAS takes int dimensions; anything larger is reported instead of silently truncated
inline int to_int(int64_t v, const char* what) {
  DSV3_CHECK(v >= 0 && v <= INT_MAX, "CUDA backend: " << what << " = " << v << " does not fit cuBLAS's int");
  return (int)v;
}

}  // namespace dsv3::cuda
