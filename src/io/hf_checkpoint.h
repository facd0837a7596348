// defines: dsv3::HfCheckpoint, read access to a Hugging Face safetensors checkpoint (sharded or not),
//          including the DeepSeek-V3 block-FP8 weights (F8_E4M3 + "<name>_scale_inv")
#pragma once
#include <array>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "io/safetensors.h"

namespace dsv3 {

class HfCheckpoint {
 public:
  // dir_or_file: a directory holding model.safetensors.index.json (sharded; preferred when both exist) or
  // model.safetensors; or a path to one .safetensors file; or a path to an index .json file.
  // Sharded: the index must have a "weight_map" object {tensor: shard file name (relative to the index's
  // directory)}; every listed shard must exist and open, and every mapped tensor must be in its shard.
  // Tensors present in a shard but absent from weight_map are also exposed (an error if two shards hold
  // the same unmapped name). fp8_block: [block_rows, block_cols] of the F8_E4M3 weights' scale_inv
  // (config.json quantization_config.weight_block_size; DeepSeek-V3: 128x128).
  explicit HfCheckpoint(const std::string& dir_or_file, std::array<int, 2> fp8_block = {128, 128});

  const std::string& path() const { return path_; }
  bool has(const std::string& name) const { return where_.count(name) != 0; }
  std::vector<std::string> names() const;  // sorted, all tensors (incl. *_scale_inv)
  const TensorView& view(const std::string& name) const;
  std::vector<int64_t> shape(const std::string& name) const;
  DType dtype(const std::string& name) const { return view(name).dtype; }
  int64_t numel(const std::string& name) const { return view(name).numel(); }
  // The file (shard) holding a tensor.
  const SafetensorsFile& file_of(const std::string& name) const;

  // float32 value: F32/BF16/F16 converted; F8_E4M3 (2-D) dequantized with "<name>_scale_inv"
  // (F32, shape [ceil(rows/b0), ceil(cols/b1)], validated). Integer tensors are an error.
  std::vector<float> load_f32(const std::string& name) const;
  void load_f32_into(const std::string& name, float* dst, int64_t expected_numel) const;  // error if numel differs

 private:
  std::string path_;
  std::array<int, 2> block_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, size_t> where_;  // tensor -> index into files_
};

}  // namespace dsv3
