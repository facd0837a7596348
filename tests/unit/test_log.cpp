// Unit tests of dsv3::log: level names, the severity and rank filters, the line format and the streams.
#include <gtest/gtest.h>

#include <boost/core/null_deleter.hpp>
#include <boost/log/core.hpp>
#include <boost/log/expressions/message.hpp>
#include <boost/log/sinks/sync_frontend.hpp>
#include <boost/log/sinks/text_ostream_backend.hpp>
#include <boost/make_shared.hpp>
#include <iostream>
#include <regex>
#include <sstream>

#include "core/error.h"
#include "core/log.h"

namespace {
namespace bl = boost::log;
using dsv3::log::Level;

// Captures every record that passes the core filter (what init() configures) as "<message>\n".
class LogCapture {
 public:
  LogCapture() {
    auto backend = boost::make_shared<bl::sinks::text_ostream_backend>();
    backend->add_stream(boost::shared_ptr<std::ostream>(&out_, boost::null_deleter()));
    backend->auto_flush(true);
    sink_ = boost::make_shared<Sink>(backend);
    sink_->set_formatter([](const bl::record_view& rec, bl::formatting_ostream& os) {
      os << rec[bl::expressions::smessage];
    });
    bl::core::get()->add_sink(sink_);
  }
  ~LogCapture() {
    bl::core::get()->remove_sink(sink_);
    dsv3::log::init(0, Level::info, false);  // back to the defaults for the other tests
  }
  std::string text() const { return out_.str(); }

 private:
  using Sink = bl::sinks::synchronous_sink<bl::sinks::text_ostream_backend>;
  std::ostringstream out_;
  boost::shared_ptr<Sink> sink_;
};

TEST(Log, ParseLevel) {
  EXPECT_EQ(dsv3::log::parse_level("trace"), Level::trace);
  EXPECT_EQ(dsv3::log::parse_level("debug"), Level::debug);
  EXPECT_EQ(dsv3::log::parse_level("info"), Level::info);
  EXPECT_EQ(dsv3::log::parse_level("warning"), Level::warning);
  EXPECT_EQ(dsv3::log::parse_level("error"), Level::error);
  try {
    dsv3::log::parse_level("verbose");
    FAIL() << "no error for a bad level";
  } catch (const dsv3::Error& e) {
    EXPECT_NE(std::string(e.what()).find("'verbose'"), std::string::npos) << e.what();
  }
}

TEST(Log, WarningLevelFiltersInfo) {
  LogCapture cap;
  dsv3::log::init(0, Level::warning);
  DSV3_LOG(debug) << "hidden-debug\n";
  DSV3_LOG(info) << "hidden-info\n";
  DSV3_LOG(warning) << "shown-warning\n";
  DSV3_LOG(error) << "shown-error\n";
  EXPECT_EQ(cap.text(), "shown-warning\nshown-error\n");
}

TEST(Log, TraceLevelShowsAll) {
  LogCapture cap;
  dsv3::log::init(0, Level::trace);
  DSV3_LOG(trace) << "t\n";
  DSV3_LOG(debug) << "d\n";
  DSV3_LOG(info) << "i\n";
  EXPECT_EQ(cap.text(), "t\nd\ni\n");
}

TEST(Log, OtherRanksOnlyLogErrorsUnlessAllRanks) {
  {
    LogCapture cap;
    dsv3::log::init(3, Level::info, false);
    DSV3_LOG(info) << "hidden-info\n";
    DSV3_LOG(warning) << "hidden-warning\n";
    DSV3_LOG(error) << "shown-error\n";
    EXPECT_EQ(cap.text(), "shown-error\n");
  }
  {
    LogCapture cap;
    dsv3::log::init(3, Level::info, true);
    DSV3_LOG(debug) << "hidden-debug\n";
    DSV3_LOG(info) << "shown-info\n";
    EXPECT_EQ(cap.text(), "shown-info\n");
  }
}

TEST(Log, FormatAndStreams) {
  dsv3::log::init(5, Level::info, true);
  std::ostringstream out, err;
  std::streambuf* old_out = std::cout.rdbuf(out.rdbuf());
  std::streambuf* old_err = std::cerr.rdbuf(err.rdbuf());
  DSV3_LOG(info) << "iter " << 7;
  DSV3_LOG(warning) << "careful";
  std::cout.rdbuf(old_out);
  std::cerr.rdbuf(old_err);
  dsv3::log::init(0, Level::info, false);
  EXPECT_TRUE(std::regex_match(out.str(), std::regex(R"(\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}\] \[r5\] info: iter 7\n)")))
      << out.str();
  EXPECT_TRUE(std::regex_match(err.str(), std::regex(R"(\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}\] \[r5\] warning: careful\n)")))
      << err.str();
}

}  // namespace
