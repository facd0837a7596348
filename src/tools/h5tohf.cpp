// dsv3-h5tohf: a dsv3 HDF5 checkpoint -> a Hugging Face DeepSeek-V3 directory.
//   dsv3-h5tohf CKPT HF_DIR [--dtype bf16|fp32|fp8] [--shard-size 5GB] [--max-memory 1GiB] [--fp8-block 128]
//               [--config config.json] [--no-progress]
//   mpirun -np N dsv3-h5tohf CKPT HF_DIR     (the shards are split round-robin over the ranks)
// Writes config.json, model-0000k-of-0000n.safetensors and model.safetensors.index.json in the HF DeepSeek-V3
// layout (one tensor per expert, the MTP module as layer num_hidden_layers with its embed/head copies). The config
// comes from --config, else the checkpoint's hf_config attribute (dsv3-hftoh5), else the model section of its deck
// (training). Streaming: at most about --max-memory bytes of tensor data per process; every dataset read is checked
// against its checksum.
#include <cstdio>
#include <iostream>

#include <boost/program_options.hpp>

#include "core/cli.h"
#include "core/error.h"
#include "io/convert.h"
#include "parallel/comm.h"

using namespace dsv3;
namespace po = boost::program_options;

namespace {
std::array<int, 2> parse_block(const std::string& s) {
  int a = 0, b = 0;
  char x = 0, extra = 0;
  const int n = std::sscanf(s.c_str(), "%d%c%d%c", &a, &x, &b, &extra);
  if (n == 1) b = a;
  DSV3_CHECK((n == 1 || (n == 3 && (x == 'x' || x == 'X' || x == ','))) && a > 0 && b > 0,
             "--fp8-block: '" << s << "' is not a block size (e.g. 128 or 128x128)");
  return {a, b};
}
}  // namespace

int main(int argc, char** argv) {
  Comm comm(&argc, &argv);
  bool started = false;  // before the conversion every rank fails alike: rank 0 reports
  try {
    po::options_description opts("dsv3-h5tohf CKPT HF_DIR [options]   (under mpirun: the ranks split the shards)");
    opts.add_options()("help,h", "print this help")(
        "dtype", po::value<std::string>()->default_value("bf16"),
        "bf16 | fp32 | fp8 (the released block-FP8 format: F8_E4M3 + <name>_scale_inv for the weights the "
        "released checkpoint quantizes, BF16 for the others); the routers' e_score_correction_bias is F32 in every dtype (as released)")(
        "shard-size", po::value<std::string>()->default_value("5GB"),
        "largest shard file (e.g. 5GB, 500MB); a single larger tensor gets a shard of its own")(
        "max-memory", po::value<std::string>()->default_value("1GiB"),
        "tensor data one process holds at once (e.g. 64MB); larger tensors are converted in row pieces")(
        "fp8-block", po::value<std::string>(),
        "FP8 block, e.g. 128 or 128x128 (default: the config's quantization_config.weight_block_size, else 128)")(
        "config", po::value<std::string>(),
        "the model's config.json (default: the checkpoint's hf_config attribute, else its deck's model section)")(
        "no-progress", po::bool_switch(), "no progress bar on stderr");
    const CommandLine cl = parse_command_line(argc, argv, opts);
    const po::variables_map& vm = cl.vm;
    if (vm.count("help")) {
      if (comm.rank() == 0)
        std::cout << opts << "\n  CKPT      a checkpoint file (iter_*.h5) or a checkpoint directory (its latest)"
                             "\n  HF_DIR    receives config.json, model-0000k-of-0000n.safetensors and"
                             "\n            model.safetensors.index.json\n";
      return 0;
    }
    const auto& args = cl.args;
    DSV3_CHECK(args.size() == 2, "expected CKPT HF_DIR, got " << args.size() << " argument(s) (see --help)");
    H5ToHfOptions o;
    o.dtype = vm["dtype"].as<std::string>();
    DSV3_CHECK(o.dtype == "bf16" || o.dtype == "fp32" || o.dtype == "fp8",
               "--dtype must be bf16, fp32 or fp8, got '" << o.dtype << "'");
    o.shard_bytes = parse_byte_size(vm["shard-size"].as<std::string>(), "--shard-size");
    o.max_memory = parse_byte_size(vm["max-memory"].as<std::string>(), "--max-memory");
    if (vm.count("fp8-block")) o.fp8_block = parse_block(vm["fp8-block"].as<std::string>());
    if (vm.count("config")) o.config_path = vm["config"].as<std::string>();
    o.progress = !vm["no-progress"].as<bool>();
    started = true;
    const ConvertStats s = convert_h5_to_hf(args[0], args[1], &comm, o);
    if (comm.rank() == 0)
      std::fprintf(stderr,
                   "dsv3-h5tohf: wrote %s: %d shard(s), %lld HF tensors (%s), %lld parameters, %s read, %s written in "
                   "%.1f s on %d rank(s); peak tensor data per rank %s (cap %s)\n",
                   s.path.c_str(), s.shards, (long long)s.tensors, o.dtype.c_str(), (long long)s.params,
                   format_bytes((double)s.bytes_in).c_str(), format_bytes((double)s.bytes_out).c_str(), s.seconds,
                   comm.size(), format_bytes((double)s.peak_buffer).c_str(),
                   format_bytes((double)o.max_memory).c_str());
    return 0;
  } catch (const std::exception& e) {
    if (e.what()[0] && (started || comm.rank() == 0)) std::fprintf(stderr, "dsv3-h5tohf: error: %s\n", e.what());
    return 2;
  }
}
