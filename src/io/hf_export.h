// defines: HfExportOptions, write_hf_checkpoint — a model's parameters as a Hugging Face DeepSeek-V3 directory:
// config.json, model-0000k-of-0000n.safetensors shards of a bounded size and model.safetensors.index.json, with
// per-expert tensors and the MTP module as layer num_hidden_layers (its tied embed_tokens / shared_head.head
// written as copies, as the released checkpoint has them). Iterates over the parameter table.
#pragma once
#include <cstdint>
#include <string>

#include "model/config.h"
#include "model/params.h"

namespace dsv3 {

struct HfExportOptions {
  std::string dtype = "bf16";           // bf16 | fp32
  int64_t shard_bytes = 5LL << 30;      // a shard is closed before it would exceed this (one tensor may exceed it)
};

// Returns the number of shards written. The directory is created; existing files of the same names are replaced.
int write_hf_checkpoint(const std::string& dir, const ModelConfig& cfg, const Params& params,
                        const HfExportOptions& opt = {});

}  // namespace dsv3
