// defines: HfToH5Options, H5ToHfOptions, ConvertStats, convert_hf_to_h5, convert_h5_to_hf, parse_byte_size,
//          format_bytes — the streaming converters behind dsv3-hftoh5 and dsv3-h5tohf
// Both directions move one piece of one tensor at a time: a piece is a range of whole rows of one HF tensor (for
// FP8, whole block rows), sized so that the tensor data a process holds at once stays within max_memory:
//   hftoh5: the piece's source bytes in the shard's mapping (released with madvise after use) + its fp32 values
//           + the tensor's scale_inv (FP8 only: 1/(128*128) of the tensor's elements);
//   h5tohf: the piece's fp32 values read from HDF5 + its output encoding (BF16 2 bytes, FP8 1 byte + scales).
// Beyond that a process holds the fixed overhead of MPI, HDF5 and the tensor directory (O(number of tensors)).
// A piece is at least one row (FP8: one block row of 128 rows), so a row larger than the cap exceeds it.
//
// HF layout (both ways): every parameter of the table under its HF name, routed experts one tensor per expert,
// the MTP module as layer num_hidden_layers with its tied embed_tokens / shared_head.head stored as copies
// (hf_aliases: written on export; on import they are not read, the main model's tensors are the parameter).
//
// MPI: every function is collective over comm (null: this process alone). hftoh5 splits the HF tensors, ordered by
// (shard, offset), into contiguous runs of equal bytes, one per rank, and each rank writes its pieces into the one
// HDF5 file with independent MPI-IO; h5tohf assigns the output shards round-robin to the ranks, each rank reading
// the checkpoint on its own (serial HDF5, read-only) and writing whole shard files; rank 0 writes the index and
// config.json. Errors are agreed: every rank throws, rank 0's message (or the failing rank's) is printed.
#pragma once
#include <array>
#include <cstdint>
#include <string>

#include "io/checkpoint.h"
#include "model/config.h"

namespace dsv3 {

class Comm;

struct ConvertStats {
  int64_t tensors = 0;          // HF tensors moved (experts counted one by one, aliases included on export)
  int64_t params = 0;           // parameters in the checkpoint (the sum of its /model dataset sizes)
  int64_t bytes_in = 0;         // tensor bytes read (all ranks)
  int64_t bytes_out = 0;        // file bytes written: the .h5 file, or every shard (all ranks)
  int64_t peak_buffer = 0;      // the most tensor data any rank held at once (bytes; compare with max_memory)
  int shards = 0;               // h5tohf: shard files written
  double seconds = 0;
  std::string path;             // hftoh5: the checkpoint file; h5tohf: the directory
};

struct HfToH5Options {
  int64_t max_memory = 1LL << 30;  // bytes of tensor data one process holds at once (see above)
  bool progress = true;            // a progress bar on stderr (rank 0)
};

// HF_DIR: config.json and model.safetensors.index.json + shards (or model.safetensors); BF16 / F16 / F32 tensors
// or the released FP8 weights (F8_E4M3 + <name>_scale_inv per quantization_config.weight_block_size), dequantized
// exactly as HfCheckpoint does. Writes CKPT_DIR/iter_0000000.h5 (weights only, no /optim; root attribute hf_config =
// the text of config.json) and CKPT_DIR/latest. Every tensor the config implies must be present with its shape;
// a tensor the config does not know is an error (like Model::load_hf).
ConvertStats convert_hf_to_h5(const std::string& hf_dir, const std::string& ckpt_dir, const Comm* comm,
                              const HfToH5Options& opt = {});

struct H5ToHfOptions {
  std::string dtype = "bf16";       // bf16 | fp32 | fp8
  int64_t shard_bytes = 5000000000; // a shard is closed before it would exceed this (one tensor may exceed it)
  int64_t max_memory = 1LL << 30;
  std::array<int, 2> fp8_block = {0, 0};  // {0, 0}: the config's quantization_config.weight_block_size (128x128)
  std::string config_path;          // a config.json to use instead of the checkpoint's (optional)
  bool progress = true;
};

// CKPT: a checkpoint file or a checkpoint directory (its `latest`). The model config: opt.config_path, else the
// root attribute hf_config (files written by convert_hf_to_h5), else the model section of the root attribute deck
// (files written by training). Writes HF_DIR/config.json, model-0000k-of-0000n.safetensors and
// model.safetensors.index.json. dtype bf16: every tensor BF16 (round to nearest even) except the routers'
// e_score_correction_bias (F32, as in the released weights); fp32: every tensor F32 (bit-exact); fp8: the tensors
// ParamSpec::fp8 marks as F8_E4M3 + <name>_scale_inv F32 [ceil(rows/b0), ceil(cols/b1)] (fp8_quantize: the released
// format), the others as with bf16, and config.json gets quantization_config {quant_method fp8, fmt e4m3,
// activation_scheme dynamic, weight_block_size}. Every dataset read is checked against its checksum.
ConvertStats convert_h5_to_hf(const std::string& ckpt, const std::string& hf_dir, const Comm* comm,
                              const H5ToHfOptions& opt = {});

// "5GB" (10^9), "64MB", "512KB", "2GiB" (2^30), "64MiB", "1e9", "123" (bytes); case-insensitive, "B" optional.
// Throws dsv3::Error naming `what` for anything else or a value <= 0.
// The model config of a checkpoint: config_path if given, else its root attribute hf_config (written by
// convert_hf_to_h5), else the model section of its deck attribute (written by training). Validated.
ModelConfig checkpoint_model_config(const CheckpointFileReader& rd, const std::string& config_path = "");

int64_t parse_byte_size(const std::string& s, const std::string& what);
std::string format_bytes(double bytes);  // "1.23 GB"

}  // namespace dsv3
