// dsv3-hftoh5: a Hugging Face DeepSeek-V3 checkpoint -> a dsv3 HDF5 checkpoint that training starts from.
//   dsv3-hftoh5 HF_DIR CKPT_DIR [--max-memory 1GiB] [--no-progress]
//   mpirun -np N dsv3-hftoh5 HF_DIR CKPT_DIR        (the ranks split the tensors; one file, MPI-IO)
// Reads HF_DIR/config.json and the (sharded) safetensors: BF16/F16/F32 or the released FP8 weights (dequantized per
// quantization_config.weight_block_size block), the MTP layer included. Writes CKPT_DIR/iter_0000000.h5 (weights
// only) and CKPT_DIR/latest; train from it with checkpoint.load = CKPT_DIR and checkpoint.finetune = true.
// Streaming: one piece of one tensor at a time, at most about --max-memory bytes of tensor data per process.
#include <cstdio>
#include <iostream>

#include <boost/program_options.hpp>

#include "core/cli.h"
#include "core/error.h"
#include "io/convert.h"
#include "parallel/comm.h"

using namespace dsv3;
namespace po = boost::program_options;

int main(int argc, char** argv) {
  Comm comm(&argc, &argv);
  bool started = false;  // before the conversion every rank fails alike: rank 0 reports
  try {
    po::options_description opts("dsv3-hftoh5 HF_DIR CKPT_DIR [options]   (under mpirun: the ranks split the work)");
    opts.add_options()("help,h", "print this help")(
        "max-memory", po::value<std::string>()->default_value("1GiB"),
        "tensor data one process holds at once (e.g. 64MB, 2GiB); tensors larger than this are converted in row "
        "pieces (FP8: whole 128-row blocks)")("no-progress", po::bool_switch(), "no progress bar on stderr");
    const CommandLine cl = parse_command_line(argc, argv, opts);
    const po::variables_map& vm = cl.vm;
    if (vm.count("help")) {
      if (comm.rank() == 0)
        std::cout << opts
                  << "\n  HF_DIR    config.json + model.safetensors.index.json and shards (or model.safetensors);"
                     "\n            BF16/F16/F32, or the released FP8 weights (F8_E4M3 + <name>_scale_inv)"
                     "\n  CKPT_DIR  receives iter_0000000.h5 (weights only) and latest; train with"
                     "\n            checkpoint.load = CKPT_DIR, checkpoint.finetune = true\n";
      return 0;
    }
    const auto& args = cl.args;
    DSV3_CHECK(args.size() == 2, "expected HF_DIR CKPT_DIR, got " << args.size() << " argument(s) (see --help)");
    HfToH5Options o;
    o.max_memory = parse_byte_size(vm["max-memory"].as<std::string>(), "--max-memory");
    o.progress = !vm["no-progress"].as<bool>();
    started = true;
    const ConvertStats s = convert_hf_to_h5(args[0], args[1], &comm, o);
    if (comm.rank() == 0)
      std::fprintf(stderr,
                   "dsv3-hftoh5: wrote %s: %lld HF tensors, %lld parameters, %s read, %s written in %.1f s "
                   "(%s/s) on %d rank(s); peak tensor data per rank %s (cap %s)\n",
                   s.path.c_str(), (long long)s.tensors, (long long)s.params, format_bytes((double)s.bytes_in).c_str(),
                   format_bytes((double)s.bytes_out).c_str(), s.seconds,
                   format_bytes(s.seconds > 0 ? s.bytes_out / s.seconds : 0).c_str(), comm.size(),
                   format_bytes((double)s.peak_buffer).c_str(), format_bytes((double)o.max_memory).c_str());
    return 0;
  } catch (const std::exception& e) {
    if (e.what()[0] && (started || comm.rank() == 0)) std::fprintf(stderr, "dsv3-hftoh5: error: %s\n", e.what());
    return 2;
  }
}
