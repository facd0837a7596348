#!/usr/bin/env bash
# gpu-pack.sh — packs the GPU test and benchmark binaries built here (a CUDA toolkit without a GPU) with the shared
# libraries they need that a bare CUDA machine lacks (OpenBLAS, libgomp, libgfortran, ...) into one archive, so that a
# GPU node without our build dependencies (no Boost/HDF5/OpenBLAS/MPI) runs them: scripts/gpu-check.sh --prebuilt.
# The MPI libraries come along only to satisfy the dynamic linker: there the programs run with DSV3_NO_MPI=1 (one
# process, no MPI call, no mpirun needed).
# The CUDA libraries (cudart, cuBLAS, cuBLASLt) and glibc are left out: the GPU node's own, matching its driver, are used.
#   scripts/gpu-pack.sh [build dir (default build)] [output (default .gpu/dsv3-gpu.tar.gz)]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${1:-$ROOT/build}
OUTF=${2:-$ROOT/.gpu/dsv3-gpu.tar.gz}
cmake --build "$BUILD" -j"${JOBS:-2}" --target dsv3_gpu_tests dsv3_gpu_bench dsv3 dsv3-golden dsv3-preprocess >/dev/null
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/dsv3-gpu/bin" "$STAGE/dsv3-gpu/lib"
bins=("$BUILD/tests/gpu/dsv3_gpu_tests" "$BUILD/tests/gpu/dsv3_gpu_bench" "$BUILD/dsv3" "$BUILD/dsv3-golden"
      "$BUILD/dsv3-preprocess")
cp "${bins[@]}" "$STAGE/dsv3-gpu/bin/"
# every resolved dependency except glibc's own libraries, the dynamic loader and CUDA's libraries
for b in "${bins[@]}"; do ldd "$b"; done | awk '$2 == "=>" && $3 ~ /^\// {print $3}' | sort -u |
  grep -vE '/(libc|libm|libdl|libpthread|librt|libresolv|libutil|libanl|libnsl|ld-linux[^/]*)\.so|/libcu(da|dart|blas|blasLt)\.so|/libnccl\.so' |
  while read -r lib; do cp -L "$lib" "$STAGE/dsv3-gpu/lib/"; done
mkdir -p "$(dirname "$OUTF")"
tar -C "$STAGE" -czf "$OUTF" dsv3-gpu
echo "gpu-pack: $OUTF ($(du -h "$OUTF" | cut -f1)): $(ls "$STAGE/dsv3-gpu/bin" "$STAGE/dsv3-gpu/lib" | grep -v : | tr '\n' ' ')"
