#include "core/cli.h"

namespace dsv3 {

namespace po = boost::program_options;

CommandLine parse_command_line(int argc, char** argv, const po::options_description& opts) {
  po::options_description hidden;
  hidden.add_options()("positional-args", po::value<std::vector<std::string>>()->default_value({}, ""), "");
  po::options_description all;
  all.add(opts).add(hidden);
  po::positional_options_description pos;
  pos.add("positional-args", -1);
  CommandLine cl;
  po::store(po::command_line_parser(argc, argv).options(all).positional(pos).run(), cl.vm);
  po::notify(cl.vm);
  cl.args = cl.vm["positional-args"].as<std::vector<std::string>>();
  return cl;
}

}  // namespace dsv3
