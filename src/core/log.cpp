// defines: dsv3::log -- Boost.Log setup: one core filter (level, rank), a stdout and a stderr sink.
#include "core/log.h"

#include <atomic>
#include <boost/core/null_deleter.hpp>
#include <boost/log/attributes/value_extraction.hpp>
#include <boost/log/core.hpp>
#include <boost/log/expressions/message.hpp>
#include <boost/log/sinks/sync_frontend.hpp>
#include <boost/log/sinks/text_ostream_backend.hpp>
#include <boost/make_shared.hpp>
#include <boost/shared_ptr.hpp>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <iostream>
#include <mutex>

#include "core/error.h"

namespace dsv3::log {

namespace {
namespace bl = boost::log;
using Sink = bl::sinks::synchronous_sink<bl::sinks::text_ostream_backend>;

std::atomic<int> g_rank{0};
std::atomic<int> g_level{int(Level::info)};
std::atomic<bool> g_all_ranks{false};

Level severity(const bl::attribute_value_set& attrs) {
  auto s = attrs["Severity"].extract<Level>();
  return s ? *s : Level::info;
}

void format(const bl::record_view& rec, bl::formatting_ostream& os) {
  auto now = std::chrono::system_clock::now();
  std::time_t t = std::chrono::system_clock::to_time_t(now);
  int ms = int(std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000);
  std::tm tm{};
  localtime_r(&t, &tm);
  char stamp[80];
  std::snprintf(stamp, sizeof stamp, "%04d-%02d-%02d %02d:%02d:%02d.%03d", tm.tm_year + 1900, tm.tm_mon + 1,
                tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ms);
  os << "[" << stamp << "] [r" << g_rank.load() << "] " << level_name(severity(rec.attribute_values()))
     << ": " << rec[bl::expressions::smessage];
}

void install() {
  static std::once_flag once;
  std::call_once(once, [] {
    auto core = bl::core::get();
    core->set_filter([](const bl::attribute_value_set& attrs) {
      Level s = severity(attrs);
      if (int(s) < g_level.load()) return false;
      return g_rank.load() == 0 || g_all_ranks.load() || s == Level::error;
    });
    auto add = [&](std::ostream& stream, bool errors) {
      auto backend = boost::make_shared<bl::sinks::text_ostream_backend>();
      backend->add_stream(boost::shared_ptr<std::ostream>(&stream, boost::null_deleter()));
      backend->auto_flush(true);
      auto sink = boost::make_shared<Sink>(backend);
      sink->set_filter([errors](const bl::attribute_value_set& attrs) {
        return (severity(attrs) >= Level::warning) == errors;
      });
      sink->set_formatter(&format);
      core->add_sink(sink);
    };
    add(std::cout, false);
    add(std::cerr, true);
  });
}
}  // namespace

const char* level_name(Level level) {
  switch (level) {
    case Level::trace: return "trace";
    case Level::debug: return "debug";
    case Level::info: return "info";
    case Level::warning: return "warning";
    case Level::error: return "error";
  }
  return "?";
}

Level parse_level(const std::string& name) {
  for (Level l : {Level::trace, Level::debug, Level::info, Level::warning, Level::error})
    if (name == level_name(l)) return l;
  DSV3_FAIL("bad log level '" << name << "' (expected trace|debug|info|warning|error)");
}

void init(int rank, Level level, bool all_ranks) {
  g_rank = rank;
  g_level = int(level);
  g_all_ranks = all_ranks;
  install();
}

namespace detail {
Logger& logger() {
  static Logger* lg = [] {
    install();
    return new Logger();  // never destroyed: logging stays usable during static destruction
  }();
  return *lg;
}
}  // namespace detail

}  // namespace dsv3::log
