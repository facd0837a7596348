// defines: dsv3::Error, DSV3_CHECK, DSV3_FAIL
// Every failure the user can cause (bad deck, bad file, bad layout) is reported as a dsv3::Error whose
// message is one line naming what is wrong (key, file, tensor, rank). Programs catch it in main(), print
// it and exit non-zero. Internal invariants use the same macros so the file:line lands in the message.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace dsv3 {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {
[[noreturn]] inline void fail(const char* file, int line, const std::string& msg) {
  std::ostringstream os;
  // one line, whatever a file put into the names the message quotes
  for (char c : msg) {
    if (c == '\n') os << "\\n";
    else if (c == '\r') os << "\\r";
    else os << c;
  }
  os << " (" << file << ":" << line << ")";
  throw Error(os.str());
}
}  // namespace detail

}  // namespace dsv3

// DSV3_FAIL("tensor " << name << " has shape " << ...): builds the message with <<, throws dsv3::Error.
#define DSV3_FAIL(msg_stream)                                  \
  do {                                                         \
    std::ostringstream dsv3_os_;                               \
    dsv3_os_ << msg_stream;                                    \
    ::dsv3::detail::fail(__FILE__, __LINE__, dsv3_os_.str());  \
  } while (0)

#define DSV3_CHECK(cond, msg_stream) \
  do {                               \
    if (!(cond)) DSV3_FAIL(msg_stream); \
  } while (0)
