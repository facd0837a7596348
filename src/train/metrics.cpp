#include "train/metrics.h"

#include <cstdio>
#include <filesystem>
#include <fstream>

#include "core/error.h"

namespace dsv3 {

MetricsWriter::MetricsWriter(const std::string& path, bool append) : path_(path) {
  if (path.empty()) return;
  const auto parent = std::filesystem::path(path).parent_path();
  std::error_code ec;
  if (!parent.empty()) std::filesystem::create_directories(parent, ec);
  out_.open(path, append ? std::ios::app : std::ios::trunc);
  DSV3_CHECK(out_, "log.metrics: cannot open '" << path << "' for writing");
}

void MetricsWriter::write(const nlohmann::json& record) {
  if (!out_.is_open()) return;
  out_ << record.dump() << '\n';
  out_.flush();
  DSV3_CHECK(out_, "log.metrics: write to '" << path_ << "' failed (disk full?)");
}

namespace {
int64_t status_kb(const char* key) {
  std::ifstream f("/proc/self/status");
  std::string line;
  const std::string k = std::string(key) + ":";
  while (std::getline(f, line))
    if (line.rfind(k, 0) == 0) return std::stoll(line.substr(k.size()));
  return 0;
}
}  // namespace

int64_t memory_rss_bytes() { return status_kb("VmRSS") * 1024; }
int64_t memory_peak_bytes() { return status_kb("VmHWM") * 1024; }

std::string format_duration(double s) {
  char buf[32];
  if (s >= 3600) std::snprintf(buf, sizeof buf, "%dh%02dm", (int)(s / 3600), (int)(s / 60) % 60);
  else if (s >= 60) std::snprintf(buf, sizeof buf, "%dm%02ds", (int)(s / 60), (int)s % 60);
  else std::snprintf(buf, sizeof buf, "%.1fs", s);
  return buf;
}

}  // namespace dsv3
