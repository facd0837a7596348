// defines: dsv3::log::{Level, init, parse_level, level_name}, DSV3_LOG(level) << ...
// Boost.Log underneath. Lines look like `[2026-11-29 15:40:01.123] [r0] info: message`; trace..info go
// to stdout, warning/error to stderr. Only rank 0 logs unless all_ranks; errors are logged by every
// rank. Logging works before init() (rank 0, level info).
#pragma once
#include <boost/log/sources/record_ostream.hpp>
#include <boost/log/sources/severity_logger.hpp>
#include <string>

namespace dsv3::log {

enum class Level { trace, debug, info, warning, error };

void init(int rank, Level level = Level::info, bool all_ranks = false);
Level parse_level(const std::string& name);  // trace|debug|info|warning|error; throws dsv3::Error
const char* level_name(Level level);

namespace detail {
using Logger = boost::log::sources::severity_logger_mt<Level>;
Logger& logger();
}  // namespace detail

}  // namespace dsv3::log

// DSV3_LOG(info) << "iter " << it;
#define DSV3_LOG(lvl) BOOST_LOG_SEV(::dsv3::log::detail::logger(), ::dsv3::log::Level::lvl)
