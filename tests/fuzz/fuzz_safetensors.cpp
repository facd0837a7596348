// libFuzzer target: the safetensors reader (src/io/safetensors.cpp). The first byte picks the form of the rest:
//   even  the rest is the whole file (8-byte header length included: lengths near 2^64, truncation, ...)
//   odd   the rest is "header JSON \0 data": the length prefix is computed, so mutations reach the JSON checks
// The file is opened, every tensor read (to_f32 / to_i64 as its dtype allows; the other one must be a clean
// error), and the views checked against the file: inside the data section, covering it exactly.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "fuzz_common.h"
#include "io/safetensors.h"

using namespace dsv3;
using dsv3_fuzz::die;
using dsv3_fuzz::expect_ok_or_error;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::string_view rest = dsv3_fuzz::as_view(data + 1, size - 1);
  const std::string file = (data[0] & 1) ? dsv3_fuzz::safetensors_from_split(rest) : std::string(rest);
  const auto path = dsv3_fuzz::scratch_dir() / "fuzz.safetensors";
  dsv3_fuzz::write_file(path, file);

  expect_ok_or_error([&] {
    SafetensorsFile f(path.string());
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; --i) hlen = (hlen << 8) | static_cast<uint8_t>(file[i]);
    const uint64_t data_size = file.size() - 8 - hlen;  // the reader accepted it: hlen <= size - 8
    uint64_t covered = 0;
    std::vector<std::pair<const uint8_t*, size_t>> spans;
    const auto names = f.names();
    if (names.size() != f.size()) die("names() and size() disagree");
    for (const std::string& n : names) {
      const TensorView& v = f.get(n);
      if (v.name != n) die("view name differs from its key: " + n);
      uint64_t numel = 1;
      for (int64_t d : v.shape) {
        if (d < 0) die("negative dimension accepted in " + n);
        numel *= static_cast<uint64_t>(d);
      }
      if (numel != static_cast<uint64_t>(v.numel()) || numel * dtype_size(v.dtype) != v.nbytes)
        die("nbytes/numel inconsistent for tensor " + n);
      covered += v.nbytes;
      spans.emplace_back(v.data, v.nbytes);
      if (dtype_is_float(v.dtype)) {
        const std::vector<float> x = f.to_f32(n);
        if (x.size() != numel) die("to_f32 size");
        expect_ok_or_error([&] { (void)f.to_i64(n); });
      } else if (v.dtype == DType::I64 || v.dtype == DType::I32) {
        const std::vector<int64_t> x = f.to_i64(n);
        if (x.size() != numel) die("to_i64 size");
        expect_ok_or_error([&] { (void)f.to_f32(n); });
      } else {  // F8_E4M3: raw bytes only (HfCheckpoint dequantizes); touch every byte
        unsigned acc = 0;
        for (size_t i = 0; i < v.nbytes; ++i) acc += v.data[i];
        (void)acc;
        expect_ok_or_error([&] { (void)f.to_f32(n); });
        expect_ok_or_error([&] { (void)f.to_i64(n); });
      }
    }
    if (covered != data_size) die("tensors cover " + std::to_string(covered) + " of " + std::to_string(data_size) +
                                  " data bytes");
    // The views must tile one contiguous range (the data section, by the byte count above).
    std::sort(spans.begin(), spans.end());
    for (size_t i = 1; i < spans.size(); ++i)
      if (spans[i].first != spans[i - 1].first + spans[i - 1].second) die("tensor views are not contiguous");
    for (const auto& [k, val] : f.metadata()) (void)k, (void)val;
    expect_ok_or_error([&] { (void)f.get("\x01no such tensor"); });
    SafetensorsFile moved(std::move(f));  // move leaves the source empty and releasable
    (void)moved.size();
  });
  return 0;
}
