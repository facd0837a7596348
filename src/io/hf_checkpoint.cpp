// defines: dsv3::HfCheckpoint (see hf_checkpoint.h)
#include "io/hf_checkpoint.h"

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "io/fp8.h"

namespace dsv3 {

namespace fs = std::filesystem;

namespace {

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

}  // namespace

HfCheckpoint::HfCheckpoint(const std::string& dir_or_file, std::array<int, 2> fp8_block)
    : path_(dir_or_file), block_(fp8_block) {
  DSV3_CHECK(block_[0] > 0 && block_[1] > 0,
             dir_or_file << ": invalid fp8 block size " << block_[0] << "x" << block_[1]);
  std::error_code ec;
  const fs::path p(dir_or_file);
  fs::path index;
  fs::path single;
  if (fs::is_directory(p, ec)) {
    if (fs::exists(p / "model.safetensors.index.json", ec))
      index = p / "model.safetensors.index.json";
    else if (fs::exists(p / "model.safetensors", ec))
      single = p / "model.safetensors";
    else
      DSV3_FAIL(dir_or_file << ": checkpoint directory has neither model.safetensors.index.json nor model.safetensors");
  } else if (fs::exists(p, ec)) {
    if (ends_with(dir_or_file, ".json"))
      index = p;
    else
      single = p;
  } else {
    DSV3_FAIL(dir_or_file << ": checkpoint not found (no such file or directory)");
  }

  if (!single.empty()) {
    files_.push_back(std::make_unique<SafetensorsFile>(single.string()));
    for (const auto& n : files_[0]->names()) where_[n] = 0;
    return;
  }

  using nlohmann::json;
  const std::string ipath = index.string();
  std::ifstream f(ipath, std::ios::binary);
  if (!f) DSV3_FAIL(ipath << ": cannot open checkpoint index: " << std::strerror(errno));
  std::stringstream ss;
  ss << f.rdbuf();
  json j;
  try {
    j = json::parse(ss.str());
  } catch (const json::exception& e) {
    DSV3_FAIL(ipath << ": checkpoint index is not valid JSON: " << e.what());
  }
  if (!j.is_object()) DSV3_FAIL(ipath << ": checkpoint index is not a JSON object");
  if (!j.contains("weight_map")) DSV3_FAIL(ipath << ": checkpoint index has no \"weight_map\"");
  const json& wm = j["weight_map"];
  if (!wm.is_object()) DSV3_FAIL(ipath << ": \"weight_map\" is not a JSON object (it is " << wm.type_name() << ")");

  const fs::path base = index.parent_path();
  std::map<std::string, size_t> shard_index;  // shard file name -> files_ index
  std::map<std::string, std::string> mapped;  // tensor -> shard name
  for (auto it = wm.begin(); it != wm.end(); ++it) {
    if (!it.value().is_string())
      DSV3_FAIL(ipath << ": weight_map entry of tensor '" << it.key() << "' is not a string");
    mapped[it.key()] = it.value().get<std::string>();
  }
  for (const auto& [tensor, shard] : mapped) {
    auto s = shard_index.find(shard);
    if (s == shard_index.end()) {
      const fs::path sp = base / shard;
      if (!fs::is_regular_file(sp, ec))
        DSV3_FAIL(ipath << ": shard '" << shard << "' (of tensor '" << tensor << "') does not exist: " << sp.string());
      files_.push_back(std::make_unique<SafetensorsFile>(sp.string()));
      s = shard_index.emplace(shard, files_.size() - 1).first;
    }
    if (!files_[s->second]->has(tensor))
      DSV3_FAIL(ipath << ": tensor '" << tensor << "' is mapped to shard " << files_[s->second]->path()
                      << " but that file does not contain it");
    where_[tensor] = s->second;
  }
  // Tensors a shard holds but weight_map does not list.
  std::map<std::string, size_t> unmapped;
  for (size_t i = 0; i < files_.size(); ++i)
    for (const auto& n : files_[i]->names()) {
      if (mapped.count(n)) continue;
      auto [it, inserted] = unmapped.emplace(n, i);
      if (!inserted)
        DSV3_FAIL(ipath << ": tensor '" << n << "' is in shards " << files_[it->second]->path() << " and "
                        << files_[i]->path() << " but not in weight_map");
      where_[n] = i;
    }
}

std::vector<std::string> HfCheckpoint::names() const {
  std::vector<std::string> r;
  r.reserve(where_.size());
  for (const auto& kv : where_) r.push_back(kv.first);
  return r;
}

const SafetensorsFile& HfCheckpoint::file_of(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) DSV3_FAIL(path_ << ": checkpoint has no tensor '" << name << "'");
  return *files_[it->second];
}

const TensorView& HfCheckpoint::view(const std::string& name) const { return file_of(name).get(name); }

std::vector<int64_t> HfCheckpoint::shape(const std::string& name) const { return view(name).shape; }

std::vector<float> HfCheckpoint::load_f32(const std::string& name) const {
  const TensorView& v = view(name);
  std::vector<float> r(static_cast<size_t>(v.numel()));
  load_f32_into(name, r.data(), v.numel());
  return r;
}

void HfCheckpoint::load_f32_into(const std::string& name, float* dst, int64_t expected_numel) const {
  const SafetensorsFile& file = file_of(name);
  const TensorView& v = file.get(name);
  if (v.numel() != expected_numel)
    DSV3_FAIL(file.path() << ": tensor '" << name << "' " << shape_str(v.shape) << " has " << v.numel()
                          << " elements, expected " << expected_numel);
  if (dtype_is_float(v.dtype)) {
    file.to_f32_into(name, dst);
    return;
  }
  if (v.dtype != DType::F8_E4M3)
    DSV3_FAIL(file.path() << ": tensor '" << name << "' is " << dtype_name(v.dtype) << ", not a float tensor");
  if (v.shape.size() != 2)
    DSV3_FAIL(file.path() << ": F8_E4M3 tensor '" << name << "' has shape " << shape_str(v.shape)
                          << ", expected 2-D for block scaling");
  const std::string sname = name + "_scale_inv";
  if (!has(sname))
    DSV3_FAIL(file.path() << ": F8_E4M3 tensor '" << name << "' has no scale tensor '" << sname << "' in the checkpoint");
  const SafetensorsFile& sfile = file_of(sname);
  const TensorView& sv = sfile.get(sname);
  const int64_t rows = v.shape[0], cols = v.shape[1];
  // Fuzzing fix: fp8_num_blocks(n, b) = (n + b - 1) / b overflowed int64 (undefined behaviour) for a dimension near
  // 2^63, which a zero-size tensor such as [2^63-1, 0] can have; fp8_scale_shape cannot overflow.
  const std::vector<int64_t> want = fp8_scale_shape(name, rows, cols, block_[0], block_[1]);
  if (sv.dtype != DType::F32)
    DSV3_FAIL(sfile.path() << ": scale tensor '" << sname << "' is " << dtype_name(sv.dtype) << ", expected F32");
  if (sv.shape != want)
    DSV3_FAIL(sfile.path() << ": scale_inv tensor '" << sname << "' has shape " << shape_str(sv.shape) << ", expected "
                           << shape_str(want) << " for " << shape_str(v.shape) << " with fp8 block " << block_[0]
                           << "x" << block_[1]);
  // Fuzzing fix: an empty tensor with 2^63-1 rows made fp8_dequantize loop over every (empty) row: a hang.
  if (v.numel() == 0) return;
  const std::vector<float> scale = sfile.to_f32(sname);  // copy: the mapping may be unaligned
  fp8_dequantize(v.data, scale.data(), rows, cols, block_[0], block_[1], dst);
}

}  // namespace dsv3
