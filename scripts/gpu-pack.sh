#!/usr/bin/env bash
# gpu-pack.sh — packs the GPU test and benchmark binaries built here (a CUDA toolkit without a GPU) with the shared
# libraries they need that a bare CUDA machine lacks (OpenBLAS, libgomp, libgfortran, ...) into one archive, so that a
# GPU node without our build dependencies (no Boost/HDF5/OpenBLAS/MPI) runs them: scripts/gpu-check.sh --prebuilt.
# The MPI libraries come along only to satisfy the dynamic linker: there the programs run with DSV3_NO_MPI=1 (one
# process, no MPI call, no mpirun needed).
# The CUDA libraries (cudart, cuBLAS, cuBLASLt, NCCL) and glibc are left out: the GPU node's own, matching its driver,
# are used (gpu-check.sh looks for them in the CUDA toolkit, /usr/lib, /usr/local/lib and /opt, where PyTorch's pip
# wheels put theirs). NCCL is the same case as cuBLAS: every CUDA toolkit install with NCCL and every PyTorch brings a
# libnccl.so.2. For a node that may lack it, PACK_NCCL=1 packs this machine's libnccl.so.2 (~210 MB) into lib-nccl/,
# which gpu-check.sh uses only when the node has none. No program links libnccl: it is loaded at run time
# (cuda/nccl_dlopen.cpp) by dsv3_nccl_tests / dsv3_nccl_bench, and by dsv3 when run.device = cuda has several ranks.
#   scripts/gpu-pack.sh [build dir (default build)] [output (default .gpu/dsv3-gpu.tar.gz)]
#   env: PACK_NCCL=1 (also pack libnccl.so.2, see above), JOBS (build parallelism, default 2)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${1:-$ROOT/build}
OUTF=${2:-$ROOT/.gpu/dsv3-gpu.tar.gz}
targets=(dsv3_gpu_tests dsv3_gpu_bench dsv3 dsv3-golden dsv3-preprocess)
bins=("$BUILD/tests/gpu/dsv3_gpu_tests" "$BUILD/tests/gpu/dsv3_gpu_bench" "$BUILD/dsv3" "$BUILD/dsv3-golden"
      "$BUILD/dsv3-preprocess")
# the NCCL transport's tests and benchmark exist when CMake found NCCL (DSV3_HAVE_NCCL)
if [ -d "$BUILD/tests/gpu/CMakeFiles/dsv3_nccl_tests.dir" ]; then
  targets+=(dsv3_nccl_tests dsv3_nccl_bench)
  bins+=("$BUILD/tests/gpu/dsv3_nccl_tests" "$BUILD/tests/gpu/dsv3_nccl_bench")
fi
cmake --build "$BUILD" -j"${JOBS:-2}" --target "${targets[@]}" >/dev/null
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/dsv3-gpu/bin" "$STAGE/dsv3-gpu/lib"
cp "${bins[@]}" "$STAGE/dsv3-gpu/bin/"
# every resolved dependency except glibc's own libraries, the dynamic loader and CUDA's libraries
for b in "${bins[@]}"; do ldd "$b"; done | awk '$2 == "=>" && $3 ~ /^\// {print $3}' | sort -u |
  grep -vE '/(libc|libm|libdl|libpthread|librt|libresolv|libutil|libanl|libnsl|ld-linux[^/]*)\.so|/libcu(da|dart|blas|blasLt)\.so|/libnccl\.so' |
  while read -r lib; do cp -L "$lib" "$STAGE/dsv3-gpu/lib/"; done
if [ "${PACK_NCCL:-0}" = 1 ] && [ -x "$STAGE/dsv3-gpu/bin/dsv3_nccl_tests" ]; then
  # libnccl is loaded at run time (cuda/nccl_dlopen.cpp), so ldd does not name it: this machine's copy
  nccl=$(ldconfig -p | awk '$1 == "libnccl.so.2" {print $NF; exit}')
  [ -n "$nccl" ] || nccl=$(find /usr/local/cuda*/ /usr/lib -name libnccl.so.2 2>/dev/null | head -1)
  [ -n "$nccl" ] || { echo "gpu-pack: PACK_NCCL=1 but this machine has no libnccl.so.2" >&2; exit 1; }
  mkdir -p "$STAGE/dsv3-gpu/lib-nccl"
  cp -L "$nccl" "$STAGE/dsv3-gpu/lib-nccl/"
fi
mkdir -p "$(dirname "$OUTF")"
tar -C "$STAGE" -czf "$OUTF" dsv3-gpu
echo "gpu-pack: $OUTF ($(du -h "$OUTF" | cut -f1)): $(ls "$STAGE"/dsv3-gpu/bin "$STAGE"/dsv3-gpu/lib* | grep -v : | tr '\n' ' ')"
