// defines: parse_command_line — the programs' command lines: named options (Boost.Program_options) plus every
// positional argument (a deck, a directory, section.key=value overrides) collected in order.
#pragma once
#include <string>
#include <vector>

#include <boost/program_options.hpp>

namespace dsv3 {

struct CommandLine {
  boost::program_options::variables_map vm;
  std::vector<std::string> args;  // the positional arguments, in order
};

CommandLine parse_command_line(int argc, char** argv, const boost::program_options::options_description& opts);

}  // namespace dsv3
