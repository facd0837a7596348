// defines: MetricsWriter (JSON-lines metrics file, rank 0), memory_rss_bytes / memory_peak_bytes, format_duration
#pragma once
#include <cstdint>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

namespace dsv3 {

// One JSON object per line, flushed each record so that a killed run keeps everything written so far.
class MetricsWriter {
 public:
  MetricsWriter() = default;
  explicit MetricsWriter(const std::string& path, bool append);  // "" = disabled; creates parent folders
  bool enabled() const { return out_.is_open(); }
  void write(const nlohmann::json& record);

 private:
  std::ofstream out_;
  std::string path_;
};

int64_t memory_rss_bytes();   // VmRSS of this process
int64_t memory_peak_bytes();  // VmHWM: peak resident set size
std::string format_duration(double seconds);  // "1h02m", "3m05s", "12.3s"

}  // namespace dsv3
