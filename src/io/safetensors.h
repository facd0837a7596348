// defines: dsv3::DType, dsv3::TensorView, dsv3::SafetensorsFile (validating mmap reader),
//          dsv3::SafetensorsWriter, bf16/f16 <-> f32 conversions
// Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, N bytes of
// JSON {"name": {"dtype", "shape", "data_offsets": [begin, end]}, ..., "__metadata__": {str: str}},
// then the data section; offsets are relative to the data section, which the tensors must cover exactly.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace dsv3 {

enum class DType { F32, F16, BF16, F8_E4M3, I64, I32 };

size_t dtype_size(DType);
const char* dtype_name(DType);  // "F32", "F16", "BF16", "F8_E4M3", "I64", "I32"
// Parses a safetensors dtype string; throws dsv3::Error "<context>: unknown dtype '<s>'".
DType dtype_from_name(const std::string& s, const std::string& context);
bool dtype_is_float(DType);  // F32/F16/BF16 (not F8: that needs scales)

float bf16_to_float(uint16_t);
uint16_t float_to_bf16(float);  // round to nearest even; NaN stays NaN (quiet, sign kept)
float f16_to_float(uint16_t);   // exact (subnormals, inf, NaN)

struct TensorView {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // into the mapping; NOT necessarily aligned for dtype: use memcpy
  size_t nbytes = 0;
  int64_t numel() const;
};

class SafetensorsFile {  // read-only, mmap'ed; non-copyable, movable
 public:
  explicit SafetensorsFile(const std::string& path);  // validates everything; throws dsv3::Error "path: what"
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  SafetensorsFile(SafetensorsFile&& o) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&& o) noexcept;

  const std::string& path() const { return path_; }
  bool has(const std::string& name) const { return tensors_.count(name) != 0; }
  const TensorView& get(const std::string& name) const;  // throws naming tensor and file
  std::vector<std::string> names() const;                // sorted
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  size_t size() const { return tensors_.size(); }

  std::vector<float> to_f32(const std::string& name) const;    // F32/F16/BF16 only
  void to_f32_into(const std::string& name, float* dst) const;  // dst holds numel floats
  std::vector<int64_t> to_i64(const std::string& name) const;  // I64/I32 only

 private:
  void release() noexcept;
  std::string path_;
  uint8_t* map_ = nullptr;
  size_t map_size_ = 0;
  std::map<std::string, TensorView> tensors_;
  std::map<std::string, std::string> metadata_;
};

class SafetensorsWriter {
 public:
  // Copies the data. nbytes must equal numel(shape)*dtype_size; names must be unique, non-empty and not
  // "__metadata__".
  void add(const std::string& name, DType dtype, std::vector<int64_t> shape, const void* data, size_t nbytes);
  void add_f32(const std::string& name, std::vector<int64_t> shape, const float* data);
  bool has(const std::string& name) const { return entries_.count(name) != 0; }
  // Header: 8-byte LE length, compact JSON (dtype, shape, data_offsets; "__metadata__" when metadata is
  // non-empty), padded with spaces so the data starts 8-byte aligned; data in sorted-name order.
  // Written to path + ".tmp", then renamed onto path.
  void write(const std::string& path,
             const std::map<std::string, std::string>& metadata = {{"format", "pt"}}) const;

 private:
  struct Entry {
    DType dtype;
    std::vector<int64_t> shape;
    std::vector<uint8_t> bytes;
  };
  std::map<std::string, Entry> entries_;
};

}  // namespace dsv3
