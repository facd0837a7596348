// defines: error_of, EXPECT_ERROR — the unit tests' check that a call fails with one dsv3::Error line naming a thing;
// TmpDir — a scratch directory removed with everything in it when the test ends
#pragma once
#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>
#include <functional>
#include <stdexcept>
#include <string>

#include "core/error.h"

namespace dsv3::test {

// The message of the dsv3::Error f throws ("<no error>" if none).
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const dsv3::Error& e) {
    return e.what();
  }
  return "<no error>";
}

struct TmpDir {
  std::string path;
  TmpDir() {
    char t[] = "/tmp/dsv3_test_XXXXXX";
    const char* p = mkdtemp(t);
    if (!p) throw std::runtime_error("mkdtemp failed");
    path = p;
  }
  ~TmpDir() { std::filesystem::remove_all(path); }
  TmpDir(const TmpDir&) = delete;
  TmpDir& operator=(const TmpDir&) = delete;
};

}  // namespace dsv3::test

// A one-line dsv3::Error containing `needle`.
#define EXPECT_ERROR(stmt, needle)                                                                \
  do {                                                                                            \
    const std::string msg_ = ::dsv3::test::error_of([&] { stmt; });                               \
    EXPECT_NE(msg_, "<no error>") << "expected an error containing: " << (needle);               \
    EXPECT_EQ(msg_.find('\n'), std::string::npos) << "not one line: " << msg_;                    \
    EXPECT_NE(msg_.find(needle), std::string::npos) << "'" << (needle) << "' not in: " << msg_;   \
  } while (0)
