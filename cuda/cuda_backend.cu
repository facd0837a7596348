// defines: make_cuda_backend, cuda_device_usable, cuda_select_device, CudaBackend's life cycle (device, stream, cuBLAS
// handle, scratch). The ops are in the family files (gemm.cu, rmsnorm.cu, ...).
#include <cstdlib>
#include <memory>
#include <string>

#include "core/error.h"
#include "cuda_backend.cuh"
#include "cuda_check.cuh"

namespace dsv3 {

bool cuda_device_usable(std::string* reason) {
  int count = 0;  // left untouched by cudaGetDeviceCount when no driver is present
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // clear it: nothing sticky is left behind
    if (reason)
      *reason = std::string("cudaGetDeviceCount: ") + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
    return false;
  }
  if (count <= 0) {
    if (reason) *reason = "cudaGetDeviceCount: 0 devices";
    return false;
  }
  return true;
}

int cuda_select_device(int hint, int device_count) {
  for (const char* var : {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID"}) {
    const char* v = std::getenv(var);
    if (!v || !*v) continue;
    char* end = nullptr;
    const long r = std::strtol(v, &end, 10);
    DSV3_CHECK(end && *end == '\0' && r >= 0, "CUDA device selection: " << var << " = '" << v
                                                                        << "' is not a node-local rank");
    return device_count > 0 ? (int)(r % device_count) : 0;
  }
  return hint < 0 ? 0 : (device_count > 0 ? hint % device_count : hint);
}

int cuda_usable_device(int device_hint) {
  std::string reason;
  DSV3_CHECK(cuda_device_usable(&reason),
             "run.device = cuda, but no CUDA device is usable on this node (" << reason << ")");
  int count = 0;
  DSV3_CUDA_CHECK(cudaGetDeviceCount(&count));
  return cuda_select_device(device_hint, count);
}

std::unique_ptr<Backend> make_cuda_backend(int device_hint) {
  return std::make_unique<CudaBackend>(cuda_usable_device(device_hint));
}

CudaBackend::CudaBackend(int device) : device_(device) {
  DSV3_CUDA_CHECK(cudaSetDevice(device_));
  DSV3_CUDA_CHECK(cudaFree(nullptr));  // creates the context now: a broken device fails here, not in the first op
  DSV3_CUDA_CHECK(cudaStreamCreate(&stream_));
  cublasHandle_t h = nullptr;
  const cublasStatus_t st = cublasCreate(&h);
  if (st != CUBLAS_STATUS_SUCCESS) {
    cudaStreamDestroy(stream_);
    DSV3_CUBLAS_CHECK(st);
  }
  cublas_ = h;
  DSV3_CUBLAS_CHECK(cublasSetStream(cublas_, stream_));
  // FP32 arithmetic (no TF32 tensor-core rounding): the CPU backend is the oracle
  DSV3_CUBLAS_CHECK(cublasSetMathMode(cublas_, CUBLAS_DEFAULT_MATH));
  DSV3_CUBLAS_CHECK(cublasSetPointerMode(cublas_, CUBLAS_POINTER_MODE_HOST));
}

CudaBackend::~CudaBackend() {
  // no throwing from a destructor: errors here mean the context is gone already
  if (cublas_) cublasDestroy(cublas_);
  if (stream_) {
    cudaStreamSynchronize(stream_);
    cudaStreamDestroy(stream_);
  }
}

void CudaBackend::synchronize() { DSV3_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

void* CudaBackend::scratch(size_t bytes) {
  if (bytes > scratch_.size()) {
    DSV3_CUDA_CHECK(cudaStreamSynchronize(stream_));  // earlier ops may still read the old scratch
    scratch_.allocate(0);
    scratch_.allocate(bytes + bytes / 4);  // some headroom: fewer re-allocations as shapes grow
  }
  return scratch_.get();
}

}  // namespace dsv3
