// Shared helpers of the libFuzzer targets in tests/fuzz/ (built by tests/fuzz/CMakeLists.txt, run by run.sh).
// The contract every target checks: a malformed input of any kind ends in a dsv3::Error with a non-empty,
// one-line message. Anything else -- another exception type, a signal, a sanitizer report, a hang, a huge
// allocation -- is a bug: the target aborts (or the sanitizer/libFuzzer reports) and libFuzzer saves the input.
#pragma once
#include <stdlib.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <typeinfo>

#include "core/error.h"

namespace dsv3_fuzz {

[[noreturn]] inline void die(const std::string& what) {
  std::fprintf(stderr, "\n==dsv3-fuzz== CONTRACT VIOLATION: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

// A dsv3::Error is the expected outcome of a malformed input; its message must be non-empty and (where the
// environment asks for it: DSV3_FUZZ_ONELINE=1) a single line.
inline void check_error_message(const std::string& msg) {
  if (msg.empty()) die("dsv3::Error with an empty message");
  static const bool oneline = [] {
    const char* e = std::getenv("DSV3_FUZZ_ONELINE");
    return e && *e == '1';
  }();
  if (oneline && msg.find('\n') != std::string::npos) die("dsv3::Error message spans lines: " + msg);
}

// Runs f(); a dsv3::Error is fine (returns false), any other exception is a bug (aborts). true: f() succeeded.
template <class F>
bool expect_ok_or_error(F&& f) {
  try {
    f();
    return true;
  } catch (const dsv3::Error& e) {
    check_error_message(e.what());
    return false;
  } catch (const std::exception& e) {
    die(std::string("exception other than dsv3::Error escaped: ") + typeid(e).name() + ": " + e.what());
  } catch (...) {
    die("non-std exception escaped");
  }
}

// A per-process scratch directory under $TMPDIR (run.sh points it at build-fuzz/tmp), removed at exit.
inline const std::filesystem::path& scratch_dir() {
  static const std::filesystem::path dir = [] {
    const char* t = std::getenv("TMPDIR");
    std::string tmpl = std::string(t && *t ? t : "/tmp") + "/dsv3-fuzz-XXXXXX";
    if (!::mkdtemp(tmpl.data())) die("cannot create a scratch directory from " + tmpl);
    static std::filesystem::path keep = tmpl;
    std::atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(keep, ec);
    });
    return std::filesystem::path(tmpl);
  }();
  return dir;
}

inline void write_file(const std::filesystem::path& p, std::string_view bytes) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!f) die("cannot write scratch file " + p.string());
}

inline std::string le64(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return s;
}

// "header JSON \0 data" -> a safetensors file with the 8-byte length computed (lets the fuzzer mutate the JSON
// freely); without a \0 the whole input is the header and the data section is empty.
inline std::string safetensors_from_split(std::string_view in) {
  const size_t z = in.find('\0');
  const std::string_view header = in.substr(0, z), data = z == std::string_view::npos ? "" : in.substr(z + 1);
  return le64(header.size()) + std::string(header) + std::string(data);
}

inline std::string_view as_view(const uint8_t* data, size_t size) {
  return std::string_view(reinterpret_cast<const char*>(data), size);
}

}  // namespace dsv3_fuzz
