#include "io/hf_export.h"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <vector>

#include "core/error.h"
#include "io/safetensors.h"

namespace dsv3 {

int write_hf_checkpoint(const std::string& dir, const ModelConfig& cfg, const Params& params,
                        const HfExportOptions& opt) {
  DSV3_CHECK(opt.dtype == "bf16" || opt.dtype == "fp32", "HF export dtype must be bf16 or fp32, got '" << opt.dtype << "'");
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  DSV3_CHECK(!ec, "cannot create the HF export directory '" << dir << "': " << ec.message());
  const bool bf16 = opt.dtype == "bf16";
  const DType dt = bf16 ? DType::BF16 : DType::F32;

  // Every HF tensor in table order: (hf name, shape, pointer to float32 values)
  struct Item {
    std::string name;
    std::vector<int64_t> shape;
    const float* data;
    int64_t numel;
  };
  std::vector<Item> items;
  for (const ParamSpec& p : params.table()) {
    const int64_t per = p.numel() / p.n_experts();
    for (int64_t e = 0; e < p.n_experts(); ++e)
      items.push_back({p.hf_name_of(e), p.hf_shape(), params.get(p.name) + e * per, per});
    for (const auto& a : p.hf_aliases) items.push_back({a, p.hf_shape(), params.get(p.name), p.numel()});
  }
  // Group into shards of at most shard_bytes
  std::vector<std::vector<const Item*>> shards(1);
  int64_t bytes = 0;
  for (const Item& it : items) {
    const int64_t b = it.numel * (bf16 ? 2 : 4);
    if (!shards.back().empty() && bytes + b > opt.shard_bytes) shards.emplace_back(), bytes = 0;
    shards.back().push_back(&it);
    bytes += b;
  }
  const int n = (int)shards.size();
  nlohmann::json weight_map = nlohmann::json::object();
  int64_t total = 0;
  std::vector<uint16_t> tmp;
  for (int s = 0; s < n; ++s) {
    char fname[64];
    std::snprintf(fname, sizeof fname, "model-%05d-of-%05d.safetensors", s + 1, n);
    SafetensorsWriter w;
    for (const Item* it : shards[s]) {
      if (bf16) {
        tmp.resize(it->numel);
        for (int64_t i = 0; i < it->numel; ++i) tmp[i] = float_to_bf16(it->data[i]);
        w.add(it->name, dt, it->shape, tmp.data(), tmp.size() * 2);
      } else {
        w.add_f32(it->name, it->shape, it->data);
      }
      weight_map[it->name] = fname;
      total += it->numel * (bf16 ? 2 : 4);
    }
    w.write(dir + "/" + fname);
  }
  nlohmann::json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
  auto write_json = [&](const std::string& name, const nlohmann::json& j) {
    const std::string path = dir + "/" + name, tmp_path = path + ".tmp";
    {
      std::ofstream f(tmp_path);
      f << j.dump(2) << "\n";
      DSV3_CHECK(f, "cannot write '" << tmp_path << "'");
    }
    std::filesystem::rename(tmp_path, path, ec);
    DSV3_CHECK(!ec, "cannot rename '" << tmp_path << "' to '" << path << "': " << ec.message());
  };
  write_json("model.safetensors.index.json", index);
  nlohmann::json c = model_config_to_json(cfg);
  c["torch_dtype"] = bf16 ? "bfloat16" : "float32";
  write_json("config.json", c);
  return n;
}

}  // namespace dsv3
