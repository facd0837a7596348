// defines: the streaming HF <-> HDF5 converters (see convert.h)
#include "io/convert.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "core/deck.h"
#include "core/error.h"
#include "io/checkpoint.h"
#include "io/fp8.h"
#include "io/hf_checkpoint.h"
#include "io/safetensors.h"
#include "model/config.h"
#include "model/params.h"
#include "parallel/comm.h"

namespace dsv3 {

namespace fs = std::filesystem;
using nlohmann::json;

std::string format_bytes(double b) {
  const char* units[] = {"B", "KB", "MB", "GB", "TB", "PB"};
  int u = 0;
  while (std::fabs(b) >= 1000 && u < 5) b /= 1000, ++u;
  char s[32];
  std::snprintf(s, sizeof s, u == 0 ? "%.0f %s" : "%.2f %s", b, units[u]);
  return s;
}

int64_t parse_byte_size(const std::string& s_in, const std::string& what) {
  std::string s;
  for (char c : s_in)
    if (c != ' ') s += (char)std::tolower((unsigned char)c);
  size_t used = 0;
  double v = 0;
  try {
    v = std::stod(s, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  std::string unit = s.substr(used);
  if (!unit.empty() && unit.back() == 'b') unit.pop_back();
  static const std::map<std::string, double> mult = {
      {"", 1},          {"k", 1e3},       {"m", 1e6},       {"g", 1e9},       {"t", 1e12},
      {"ki", 1024.0},   {"mi", 1048576.0}, {"gi", 1073741824.0}, {"ti", 1099511627776.0}};
  auto it = mult.find(unit);
  DSV3_CHECK(used > 0 && it != mult.end() && std::isfinite(v) && v * it->second >= 1 && v * it->second < 9.2e18,
             what << ": '" << s_in << "' is not a size (e.g. 5GB, 64MB, 2GiB, 1e9)");
  return (int64_t)(v * it->second);
}

namespace {

double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

int rank_of(const Comm* c) { return c ? c->rank() : 0; }
int size_of(const Comm* c) { return c ? c->size() : 1; }

int64_t allreduce_sum(const Comm* comm, int64_t x) {
  if (comm) comm->allreduce_sum(GroupKind::world, &x, 1);
  return x;
}
int64_t allreduce_max(const Comm* comm, int64_t x) {
  if (!comm) return x;
  std::vector<int64_t> all(comm->size(), 0);
  all[comm->rank()] = x;
  comm->allreduce_sum(GroupKind::world, all.data(), (int64_t)all.size());
  return *std::max_element(all.begin(), all.end());
}

std::string read_text(const std::string& path, const std::string& what) {
  std::ifstream f(path, std::ios::binary);
  DSV3_CHECK(f, what << ": cannot open '" << path << "': " << std::strerror(errno));
  std::ostringstream os;
  os << f.rdbuf();
  return os.str();
}

json parse_json(const std::string& text, const std::string& source) {
  try {
    json j = json::parse(text);
    DSV3_CHECK(j.is_object(), source << ": not a JSON object");
    return j;
  } catch (const json::exception& e) {
    DSV3_FAIL(source << ": not valid JSON: " << e.what());
  }
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

int64_t numel_of(const std::vector<int64_t>& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}
// rows x cols view of a tensor: rows = dim 0, cols = the rest (a scalar is 1 x 1)
void rows_cols(const std::vector<int64_t>& s, int64_t& rows, int64_t& cols) {
  rows = s.empty() ? 1 : s[0];
  cols = s.empty() ? 1 : (s[0] == 0 ? 0 : numel_of(s) / s[0]);
}

// Rows per piece: as many as fit in `budget` bytes at `per_row` bytes each, a multiple of `align`, at least align.
int64_t rows_per_piece(int64_t budget, int64_t per_row, int64_t align, int64_t rows) {
  int64_t r = per_row > 0 ? std::max<int64_t>(budget, 0) / per_row : rows;
  r = std::max<int64_t>(align, r / align * align);
  return std::max<int64_t>(1, std::min(r, std::max<int64_t>(rows, 1)));
}

// Drops the pages of [p - margin, p + n + margin) of a read-only file mapping from this process (they stay in the
// page cache and are read again if touched), clipped to [lo, hi), the data section of that file: the mapping of a
// shard then never holds more than the piece being converted. The margin covers the kernel's fault-around, which maps
// up to 64 KiB of cached pages around each fault, also before the piece (pages of tensors already done).
void release_pages(const void* p, size_t n, const uint8_t* lo, const uint8_t* hi) {
  if (n == 0) return;
  static const uintptr_t pg = (uintptr_t)sysconf(_SC_PAGESIZE);
  constexpr uintptr_t margin = 256 << 10;
  const uintptr_t l = (uintptr_t)lo & ~(pg - 1), h = ((uintptr_t)hi + pg - 1) & ~(pg - 1);
  const uintptr_t a = std::max(l, (((uintptr_t)p > margin ? (uintptr_t)p - margin : 0)) & ~(pg - 1));
  const uintptr_t b = std::min(h, ((uintptr_t)p + n + margin + pg - 1) & ~(pg - 1));
  if (a < b) ::madvise((void*)a, b - a, MADV_DONTNEED);
}

// F32 / BF16 / F16 elements [e0, e0 + n) of a tensor view -> float32 (the same conversions as SafetensorsFile).
void decode(const TensorView& v, int64_t e0, int64_t n, float* dst) {
  const uint8_t* src = v.data + e0 * (int64_t)dtype_size(v.dtype);
  switch (v.dtype) {
    case DType::F32: std::memcpy(dst, src, (size_t)n * 4); return;
    case DType::BF16:
    case DType::F16: {
      const bool bf = v.dtype == DType::BF16;
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        dst[i] = bf ? bf16_to_float(h) : f16_to_float(h);
      }
      return;
    }
    default: DSV3_FAIL("tensor '" << v.name << "' is " << dtype_name(v.dtype) << ", not a float tensor");
  }
}

// ---- progress bar -----------------------------------------------------------------------------------------------------
// On a terminal: one line redrawn at most 5 times a second; otherwise (a log file) a line at every 10% and at least
// every 30 s.
class Progress {
 public:
  Progress(std::string label, int64_t tensors, int64_t bytes, bool enabled, std::string note)
      : label_(std::move(label)), note_(std::move(note)), total_t_(tensors), total_b_(bytes), on_(enabled),
        tty_(::isatty(2) == 1), t0_(now_s()) {
    if (on_) print(false, true);
  }
  void add(int64_t tensors, int64_t bytes) {
    done_t_ += tensors;
    done_b_ += bytes;
    if (on_) print(false, false);
  }
  void finish() {
    if (on_ && !finished_) print(true, true);
    finished_ = true;
  }

 private:
  void print(bool final, bool force) {
    const double t = now_s(), el = t - t0_;
    const double frac = total_b_ > 0 ? (double)done_b_ / total_b_ : total_t_ > 0 ? (double)done_t_ / total_t_ : 1.0;
    const int decile = (int)(frac * 10);
    if (!force && !final) {
      if (tty_ && t - last_ < 0.2) return;
      if (!tty_ && decile <= last_decile_ && t - last_ < 30) return;
    }
    last_ = t;
    last_decile_ = decile;
    const int width = 24, fill = std::min(width, (int)(frac * width));
    std::string bar = std::string(fill, '#') + std::string(width - fill, '-');
    const double rate = el > 0 ? done_b_ / el : 0;
    char eta[32] = "--:--";
    if (final) {
      std::snprintf(eta, sizeof eta, "done in %.1f s", el);
    } else if (rate > 0 && done_b_ > 0) {
      const int64_t s = (int64_t)((total_b_ - done_b_) / rate);
      std::snprintf(eta, sizeof eta, "ETA %lld:%02lld", (long long)(s / 60), (long long)(s % 60));
    }
    char line[512];
    std::snprintf(line, sizeof line, "%s [%s] %3d%%  %lld/%lld tensors  %s / %s  %s/s  %s%s", label_.c_str(),
                  bar.c_str(), (int)(frac * 100), (long long)done_t_, (long long)total_t_,
                  format_bytes((double)done_b_).c_str(), format_bytes((double)total_b_).c_str(),
                  format_bytes(rate).c_str(), eta, note_.c_str());
    if (tty_) std::fprintf(stderr, "\r%s\033[K%s", line, final ? "\n" : "");
    else std::fprintf(stderr, "%s\n", line);
    std::fflush(stderr);
  }
  std::string label_, note_;
  int64_t total_t_, total_b_, done_t_ = 0, done_b_ = 0;
  bool on_, tty_, finished_ = false;
  double t0_, last_ = 0;
  int last_decile_ = -1;
};

// ---- a safetensors file written piece by piece ---------------------------------------------------------------------
// The header is the one SafetensorsWriter writes (compact JSON with "__metadata__": {"format": "pt"}, padded with
// spaces to 8-byte alignment, data in sorted-name order), so the files are byte-identical to its; the data of any
// tensor can then be written at any time (pwrite) into the preallocated file. Written as path.tmp, renamed by
// finish(); a writer destroyed without finish() deletes the .tmp.
class ShardWriter {
 public:
  struct Entry {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
  };
  ShardWriter(const std::string& path, const std::vector<Entry>& entries) : path_(path), tmp_(path + ".tmp") {
    json header = json::object();
    header["__metadata__"] = json{{"format", "pt"}};
    std::map<std::string, const Entry*> sorted;
    for (const Entry& e : entries) {
      DSV3_CHECK(sorted.emplace(e.name, &e).second, path << ": tensor '" << e.name << "' twice in one shard");
    }
    uint64_t off = 0;
    for (const auto& [name, e] : sorted) {
      const uint64_t nb = (uint64_t)numel_of(e->shape) * dtype_size(e->dtype);
      json t = json::object();
      t["dtype"] = dtype_name(e->dtype);
      t["shape"] = e->shape;
      t["data_offsets"] = {off, off + nb};
      header[name] = t;
      where_[name] = {off, nb};
      off += nb;
    }
    std::string h = header.dump();
    while ((8 + h.size()) % 8 != 0) h.push_back(' ');
    data0_ = 8 + h.size();
    size_ = data0_ + off;
    fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    DSV3_CHECK(fd_ >= 0, tmp_ << ": cannot create: " << std::strerror(errno));
    uint8_t len[8];
    for (int i = 0; i < 8; ++i) len[i] = (uint8_t)((uint64_t)h.size() >> (8 * i));
    put(0, len, 8);
    put(8, h.data(), h.size());
    DSV3_CHECK(::ftruncate(fd_, (off_t)size_) == 0, tmp_ << ": cannot size the file to " << size_ << " bytes: "
                                                          << std::strerror(errno));
  }
  ~ShardWriter() {
    if (fd_ >= 0) {
      ::close(fd_);
      ::unlink(tmp_.c_str());
    }
  }
  ShardWriter(const ShardWriter&) = delete;
  ShardWriter& operator=(const ShardWriter&) = delete;
  // bytes [off, off + n) of a tensor's data
  void write(const std::string& name, uint64_t off, const void* p, size_t n) {
    auto it = where_.find(name);
    DSV3_CHECK(it != where_.end() && off + n <= it->second.second,
               tmp_ << ": write of bytes [" << off << ", " << off + n << ") of tensor '" << name << "' out of range");
    put(data0_ + it->second.first + off, p, n);
  }
  int64_t bytes() const { return (int64_t)size_; }
  void finish() {
    DSV3_CHECK(::fsync(fd_) == 0, tmp_ << ": fsync failed: " << std::strerror(errno));
    const int rc = ::close(fd_);
    fd_ = -1;
    DSV3_CHECK(rc == 0, tmp_ << ": close failed: " << std::strerror(errno));
    std::error_code ec;
    fs::rename(tmp_, path_, ec);
    DSV3_CHECK(!ec, tmp_ << ": cannot rename onto " << path_ << ": " << ec.message());
  }

 private:
  void put(uint64_t pos, const void* p, size_t n) {
    const char* c = static_cast<const char*>(p);
    while (n > 0) {
      const ssize_t w = ::pwrite(fd_, c, std::min<size_t>(n, 1 << 30), (off_t)pos);
      if (w < 0 && errno == EINTR) continue;
      DSV3_CHECK(w > 0, tmp_ << ": write failed at byte " << pos << " (disk full?): " << std::strerror(errno));
      c += w, pos += (uint64_t)w, n -= (size_t)w;
    }
  }
  std::string path_, tmp_;
  int fd_ = -1;
  uint64_t data0_ = 0, size_ = 0;
  std::map<std::string, std::pair<uint64_t, uint64_t>> where_;  // name -> (offset in the data section, bytes)
};

void write_json_file(const std::string& path, const json& j) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::trunc);
    f << j.dump(2) << "\n";
    f.flush();
    DSV3_CHECK(f, "cannot write '" << tmp << "'");
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  DSV3_CHECK(!ec, "cannot rename '" << tmp << "' to '" << path << "': " << ec.message());
}

// resolved_text writes a relative path as `key = "raw"  # from ORIGIN (path: RESOLVED)`: use RESOLVED, so the deck
// of a checkpoint reads the same files from any working directory.
std::string deck_with_resolved_paths(const std::string& text) {
  std::istringstream in(text);
  std::string out, line;
  while (std::getline(in, line)) {
    const size_t p = line.rfind(" (path: "), eq = line.find('=');
    if (p != std::string::npos && eq != std::string::npos && !line.empty() && line.back() == ')' &&
        line.find('#') != std::string::npos) {
      const std::string resolved = line.substr(p + 8, line.size() - 1 - (p + 8));
      line = line.substr(0, eq) + "= \"" + resolved + "\"";
    }
    out += line + "\n";
  }
  return out;
}

}  // namespace

// ==== HF -> HDF5 ====================================================================================================
ConvertStats convert_hf_to_h5(const std::string& hf_dir, const std::string& ckpt_dir, const Comm* comm,
                              const HfToH5Options& opt) {
  const double t0 = now_s();
  const int rank = rank_of(comm), size = size_of(comm);
  DSV3_CHECK(opt.max_memory > 0, "--max-memory must be > 0");
  // the config: rank 0 reads it, every rank parses the same text
  const std::string cfg_path = (fs::path(hf_dir) / "config.json").string();
  std::string text, err;
  if (rank == 0) {
    try {
      text = read_text(cfg_path, "HF checkpoint " + hf_dir);
    } catch (const std::exception& e) {
      err = e.what();
    }
  }
  agree(comm, err, "reading " + cfg_path);
  if (comm) comm->bcast_string(text);
  const ModelConfig cfg = model_config_from_json(parse_json(text, cfg_path), cfg_path);
  cfg.validate();
  const std::vector<ParamSpec> table = build_param_table(cfg);
  const int b0 = cfg.fp8_block[0], b1 = cfg.fp8_block[1];

  // open every shard and check every tensor the config implies (every rank: the same result)
  struct Unit {
    size_t param = 0;
    int64_t expert = 0;
    const TensorView* view = nullptr;
    const TensorView* scale = nullptr;  // FP8: <name>_scale_inv
    const SafetensorsFile* file = nullptr;
    const uint8_t *lo = nullptr, *hi = nullptr;  // the file's data section (every tensor of it)
    int64_t bytes = 0, offset = 0;
  };
  std::unique_ptr<HfCheckpoint> ck;
  std::vector<Unit> units;
  try {
    ck = std::make_unique<HfCheckpoint>(hf_dir, cfg.fp8_block);
    std::set<std::string> known;
    for (size_t pi = 0; pi < table.size(); ++pi) {
      const ParamSpec& p = table[pi];
      for (int64_t e = 0; e < p.n_experts(); ++e) {
        const std::string hf = p.hf_name_of(e);
        DSV3_CHECK(ck->has(hf), "HF checkpoint " << hf_dir << " has no tensor '" << hf
                                                 << "' (the model config expects it)");
        Unit u;
        u.param = pi;
        u.expert = e;
        u.view = &ck->view(hf);
        u.file = &ck->file_of(hf);
        DSV3_CHECK(u.view->shape == p.hf_shape(), u.file->path() << ": tensor '" << hf << "' has shape "
                                                                 << shape_str(u.view->shape)
                                                                 << ", the model config implies "
                                                                 << shape_str(p.hf_shape()));
        u.bytes = (int64_t)u.view->nbytes;
        if (u.view->dtype == DType::F8_E4M3) {
          DSV3_CHECK(u.view->shape.size() == 2, u.file->path() << ": F8_E4M3 tensor '" << hf << "' is not 2-D");
          const std::string sn = hf + "_scale_inv";
          DSV3_CHECK(ck->has(sn), u.file->path() << ": F8_E4M3 tensor '" << hf << "' has no scale tensor '" << sn
                                                 << "' in the checkpoint");
          u.scale = &ck->view(sn);
          const std::vector<int64_t> want = fp8_scale_shape(hf, u.view->shape[0], u.view->shape[1], b0, b1);
          DSV3_CHECK(u.scale->dtype == DType::F32 && u.scale->shape == want,
                     ck->file_of(sn).path() << ": scale tensor '" << sn << "' is " << dtype_name(u.scale->dtype)
                                            << " " << shape_str(u.scale->shape) << ", expected F32 "
                                            << shape_str(want) << " for fp8 block " << b0 << "x" << b1);
          u.bytes += (int64_t)u.scale->nbytes;
        } else {
          DSV3_CHECK(dtype_is_float(u.view->dtype), u.file->path() << ": tensor '" << hf << "' is "
                                                                   << dtype_name(u.view->dtype)
                                                                   << ", not a float tensor");
        }
        units.push_back(u);
        known.insert(hf);
        known.insert(hf + "_scale_inv");
      }
      for (const auto& a : p.hf_aliases) known.insert(a), known.insert(a + "_scale_inv");
    }
    for (const auto& n : ck->names())
      DSV3_CHECK(known.count(n), "HF checkpoint " << hf_dir << ": tensor '" << n
                                                  << "' is not part of the model config.json describes "
                                                  << "(check num_hidden_layers / num_nextn_predict_layers)");
  } catch (const std::exception& e) {
    err = e.what();
  }
  agree(comm, err, "opening HF checkpoint " + hf_dir);

  // (shard, offset) order; contiguous runs of equal bytes per rank
  std::map<const SafetensorsFile*, const uint8_t*> base;
  for (const Unit& u : units) {
    auto [it, fresh] = base.emplace(u.file, u.view->data);
    if (!fresh) it->second = std::min(it->second, u.view->data);
  }
  std::map<const SafetensorsFile*, std::pair<const uint8_t*, const uint8_t*>> bounds;
  for (const std::string& n : ck->names()) {
    const TensorView& v = ck->view(n);
    auto [it, fresh] = bounds.emplace(&ck->file_of(n), std::make_pair(v.data, v.data + v.nbytes));
    if (!fresh) it->second = {std::min(it->second.first, v.data), std::max(it->second.second, v.data + v.nbytes)};
  }
  for (Unit& u : units) {
    u.offset = u.view->data - base[u.file];
    u.lo = bounds[u.file].first;
    u.hi = bounds[u.file].second;
  }
  std::sort(units.begin(), units.end(), [](const Unit& a, const Unit& b) {
    return a.file->path() != b.file->path() ? a.file->path() < b.file->path() : a.offset < b.offset;
  });
  int64_t total = 0;
  for (const Unit& u : units) total += u.bytes;
  std::vector<const Unit*> mine;
  int64_t my_bytes = 0, cum = 0;
  for (const Unit& u : units) {
    const int owner = total > 0 ? (int)std::min<int64_t>(size - 1, (int64_t)(((double)cum + u.bytes / 2.0) * size / total))
                                : 0;
    cum += u.bytes;
    if (owner == rank) mine.push_back(&u), my_bytes += u.bytes;
  }

  std::vector<CheckpointDataset> datasets;
  for (const ParamSpec& p : table) datasets.push_back({"/model/" + p.name, p.shape});
  std::string abs_cfg = fs::absolute(cfg_path).lexically_normal().string();
  const std::string deck = "# written by dsv3-hftoh5 from " + fs::absolute(hf_dir).lexically_normal().string() +
                           "; the config.json is the root attribute hf_config\n[model]\nhf_config = \"" + abs_cfg +
                           "\"\n";
  TrainState st;
  st.rng_seed = -1;
  CheckpointFileWriter w(ckpt_dir, comm, datasets, st, deck,
                         "dsv3-hftoh5 (" + std::to_string(size) + " rank" + (size > 1 ? "s" : "") + ")",
                         {{"hf_config", text}, {"converted_from", fs::absolute(hf_dir).lexically_normal().string()}});

  Progress prog("hftoh5", (int64_t)mine.size(), my_bytes, rank == 0 && opt.progress,
                size > 1 ? "  (rank 0's share of " + std::to_string(size) + ")" : "");
  int64_t peak = 0, bytes_in = 0;
  std::string lerr;
  try {
    std::vector<float> buf, scale;
    for (const Unit* u : mine) {
      const TensorView& v = *u->view;
      const ParamSpec& p = table[u->param];
      int64_t rows, cols;
      rows_cols(v.shape, rows, cols);
      const bool f8 = v.dtype == DType::F8_E4M3;
      const int64_t in_sz = (int64_t)dtype_size(v.dtype), first = u->expert * (p.numel() / p.n_experts());
      scale = std::vector<float>();
      if (f8) {
        scale.resize(u->scale->numel());
        std::memcpy(scale.data(), u->scale->data, u->scale->nbytes);  // the mapping may be unaligned
        release_pages(u->scale->data, u->scale->nbytes, u->lo, u->hi);
      }
      const int64_t scale_bytes = f8 ? (int64_t)scale.size() * 4 : 0;
      const int64_t piece = rows_per_piece(opt.max_memory - scale_bytes, cols * (in_sz + 4), f8 ? b0 : 1, rows);
      const size_t need = (size_t)std::min(piece * cols, std::max<int64_t>(v.numel(), 1));
      if (buf.size() != need) buf = std::vector<float>(need);  // (exactly: the memory held is what the piece needs)
      peak = std::max(peak, (int64_t)buf.capacity() * 4 + piece * cols * in_sz + (int64_t)scale.capacity() * 4);
      for (int64_t r0 = 0; r0 < rows; r0 += piece) {
        const int64_t nr = std::min(piece, rows - r0), n = nr * cols;
        const uint8_t* src = v.data + r0 * cols * in_sz;
        if (f8)
          fp8_dequantize(src, scale.data() + (r0 / b0) * fp8_num_blocks(cols, b1), nr, cols, b0, b1, buf.data());
        else
          decode(v, r0 * cols, n, buf.data());
        release_pages(src, (size_t)(n * in_sz), u->lo, u->hi);
        w.write(u->param, first + r0 * cols, n, buf.data());
        bytes_in += n * in_sz;
        prog.add(0, n * in_sz);
      }
      bytes_in += scale_bytes;
      prog.add(1, scale_bytes);
    }
  } catch (const std::exception& e) {
    lerr = e.what();
    if (lerr.empty()) lerr = "conversion failed";
  }
  prog.finish();
  const SaveResult res = w.finish(lerr);
  ConvertStats st_out;
  st_out.tensors = (int64_t)units.size();
  for (const ParamSpec& p : table) st_out.params += p.numel();
  st_out.bytes_in = allreduce_sum(comm, bytes_in);
  st_out.bytes_out = allreduce_sum(comm, res.bytes);  // (known on rank 0)
  st_out.peak_buffer = allreduce_max(comm, peak);
  st_out.seconds = now_s() - t0;
  st_out.path = res.path;
  return st_out;
}

// ==== HDF5 -> HF ====================================================================================================
ModelConfig checkpoint_model_config(const CheckpointFileReader& rd, const std::string& config_path) {
  json cj;
  std::string source;
  if (!config_path.empty()) {
    source = config_path;
    cj = parse_json(read_text(source, "--config"), source);
  } else if (std::string t = rd.attr("hf_config"); !t.empty()) {
    source = rd.path() + " (attribute hf_config)";
    cj = parse_json(t, source);
  } else {
    source = rd.path() + " (the model section of its deck attribute)";
    const std::string deck_text = rd.attr("deck");
    DSV3_CHECK(!deck_text.empty(), "checkpoint " << rd.path() << " has neither an hf_config nor a deck attribute: "
                                                 << "give the model's config.json with --config");
    try {
      const Deck deck = Deck::parse_text(deck_with_resolved_paths(deck_text), rd.path() + ":deck");
      cj = model_config_to_json(model_config_from_deck(deck));
    } catch (const std::exception& e) {
      DSV3_FAIL("checkpoint " << rd.path() << ": cannot rebuild the model config from its deck attribute ("
                              << e.what() << "): give the model's config.json with --config");
    }
  }
  ModelConfig cfg = model_config_from_json(cj, source);
  cfg.validate();
  return cfg;
}

ConvertStats convert_h5_to_hf(const std::string& ckpt, const std::string& hf_dir, const Comm* comm,
                              const H5ToHfOptions& opt) {
  const double t0 = now_s();
  const int rank = rank_of(comm), size = size_of(comm);
  DSV3_CHECK(opt.dtype == "bf16" || opt.dtype == "fp32" || opt.dtype == "fp8",
             "--dtype must be bf16, fp32 or fp8, got '" << opt.dtype << "'");
  DSV3_CHECK(opt.max_memory > 0 && opt.shard_bytes > 0, "--max-memory and --shard-size must be > 0");
  const bool fp8 = opt.dtype == "fp8", fp32 = opt.dtype == "fp32";

  // every rank opens the file (serial HDF5, read-only) and derives the same config
  std::unique_ptr<CheckpointFileReader> rd;
  json cj;
  ModelConfig cfg;
  std::vector<ParamSpec> table;
  std::string err;
  try {
    rd = std::make_unique<CheckpointFileReader>(ckpt);
    cfg = checkpoint_model_config(*rd, opt.config_path);
    cj = model_config_to_json(cfg);
    if (opt.config_path.empty()) {
      if (std::string t = rd->attr("hf_config"); !t.empty()) cj = parse_json(t, rd->path() + " (attribute hf_config)");
    } else {
      cj = parse_json(read_text(opt.config_path, "--config"), opt.config_path);
    }
    table = build_param_table(cfg);
    for (const ParamSpec& p : table) {
      const std::string ds = "/model/" + p.name;
      DSV3_CHECK(rd->has(ds), "checkpoint " << rd->path() << ": dataset " << ds
                                            << " is missing (the model config implies it)");
      const auto sh = rd->shape(ds);
      DSV3_CHECK(sh == p.shape, "checkpoint " << rd->path() << ": dataset " << ds << " has shape " << shape_str(sh)
                                              << ", the model config implies " << shape_str(p.shape));
    }
  } catch (const std::exception& e) {
    err = e.what();
  }
  agree(comm, err, "opening checkpoint " + ckpt);
  const std::array<int, 2> blk = opt.fp8_block[0] > 0 ? opt.fp8_block : cfg.fp8_block;
  const int b0 = blk[0], b1 = blk[1];
  DSV3_CHECK(b0 > 0 && b1 > 0, "invalid fp8 block " << b0 << "x" << b1);

  // every HF tensor, in table order, and the shards
  struct Item {
    std::string name;
    std::vector<int64_t> shape;
    size_t param = 0;
    int64_t first = 0, numel = 0;
    DType dtype = DType::F32;
    bool quant = false, alias = false;
    int64_t bytes = 0;
  };
  std::vector<Item> items;
  for (size_t pi = 0; pi < table.size(); ++pi) {
    const ParamSpec& p = table[pi];
    const int64_t per = p.numel() / p.n_experts();
    auto add = [&](const std::string& name, int64_t first, bool alias) {
      Item it;
      it.name = name;
      it.shape = p.hf_shape();
      it.param = pi;
      it.first = first;
      it.numel = per;
      it.alias = alias;
      it.quant = fp8 && p.fp8 && it.shape.size() == 2;
      it.dtype = fp32 || !p.trainable ? DType::F32 : it.quant ? DType::F8_E4M3 : DType::BF16;
      it.bytes = per * (int64_t)dtype_size(it.dtype);
      if (it.quant) {
        const std::vector<int64_t> sc = fp8_scale_shape(it.name, it.shape[0], it.shape[1], b0, b1);
        it.bytes += sc[0] * sc[1] * 4;
      }
      items.push_back(std::move(it));
    };
    for (int64_t e = 0; e < p.n_experts(); ++e) add(p.hf_name_of(e), e * per, false);
    for (const auto& a : p.hf_aliases) add(a, 0, true);
  }
  std::vector<std::vector<const Item*>> shards(1);
  std::vector<int64_t> shard_bytes(1, 0);
  for (const Item& it : items) {
    if (!shards.back().empty() && shard_bytes.back() + it.bytes > opt.shard_bytes)
      shards.emplace_back(), shard_bytes.push_back(0);
    shards.back().push_back(&it);
    shard_bytes.back() += it.bytes;
  }
  const int nshards = (int)shards.size();
  auto shard_name = [&](int s) {
    char f[64];
    std::snprintf(f, sizeof f, "model-%05d-of-%05d.safetensors", s + 1, nshards);
    return std::string(f);
  };
  int64_t my_tensors = 0, my_bytes = 0;
  for (int s = rank; s < nshards; s += size) my_tensors += (int64_t)shards[s].size(), my_bytes += shard_bytes[s];

  if (rank == 0) {
    std::error_code ec;
    fs::create_directories(hf_dir, ec);
    if (ec) err = "cannot create the HF directory '" + hf_dir + "': " + ec.message();
  }
  agree(comm, err, "creating " + hf_dir);

  Progress prog("h5tohf", my_tensors, my_bytes, rank == 0 && opt.progress,
                size > 1 ? "  (rank 0's share of " + std::to_string(size) + ")" : "");
  std::vector<uint64_t> sums(table.size(), 0);
  int64_t peak = 0, bytes_out = 0, bytes_in = 0;
  std::string lerr;
  try {
    std::vector<float> buf, scale;
    std::vector<uint16_t> b16;
    std::vector<uint8_t> codes;
    for (int s = rank; s < nshards; s += size) {
      std::vector<ShardWriter::Entry> entries;
      for (const Item* it : shards[s]) {
        entries.push_back({it->name, it->dtype, it->shape});
        if (it->quant)
          entries.push_back({it->name + "_scale_inv", DType::F32,
                             fp8_scale_shape(it->name, it->shape[0], it->shape[1], b0, b1)});
      }
      ShardWriter sw((fs::path(hf_dir) / shard_name(s)).string(), entries);
      std::vector<const Item*> order = shards[s];
      std::sort(order.begin(), order.end(), [](const Item* a, const Item* b) { return a->name < b->name; });
      for (const Item* it : order) {
        const std::string ds = "/model/" + table[it->param].name;
        int64_t rows, cols;
        rows_cols(it->shape, rows, cols);
        const int64_t out_sz = it->dtype == DType::F32 ? 0 : (int64_t)dtype_size(it->dtype);
        const int64_t nbc = it->quant ? fp8_num_blocks(cols, b1) : 0;
        const int64_t piece = rows_per_piece(opt.max_memory, cols * (4 + out_sz), it->quant ? b0 : 1, rows);
        const int64_t cap = std::min(piece * cols, std::max<int64_t>(it->numel, 1));
        // exactly what this tensor's pieces need (the memory held is what the piece needs)
        if (buf.size() != (size_t)cap) buf = std::vector<float>(cap);
        b16 = std::vector<uint16_t>(it->dtype == DType::BF16 ? cap : 0);
        codes = std::vector<uint8_t>(it->quant ? cap : 0);
        scale = std::vector<float>(it->quant ? (size_t)(fp8_num_blocks(std::min(piece, rows), b0) * nbc) : 0);
        peak = std::max(peak, (int64_t)(buf.capacity() * 4 + b16.capacity() * 2 + codes.capacity() +
                                         scale.capacity() * 4));
        for (int64_t r0 = 0; r0 < rows; r0 += piece) {
          const int64_t nr = std::min(piece, rows - r0), n = nr * cols, g = it->first + r0 * cols;
          rd->read(ds, g, n, buf.data());
          bytes_in += n * 4;
          if (!it->alias) sums[it->param] += checkpoint_checksum(buf.data(), n, g);
          if (it->dtype == DType::F32) {
            sw.write(it->name, (uint64_t)(r0 * cols) * 4, buf.data(), (size_t)n * 4);
          } else if (it->dtype == DType::BF16) {
            const float* x = buf.data();
            uint16_t* y = b16.data();
#pragma omp parallel for schedule(static)
            for (int64_t i = 0; i < n; ++i) y[i] = float_to_bf16(x[i]);
            sw.write(it->name, (uint64_t)(r0 * cols) * 2, b16.data(), (size_t)n * 2);
          } else {
            const int64_t sr = fp8_num_blocks(nr, b0);
            fp8_quantize(buf.data(), nr, cols, b0, b1, codes.data(), scale.data());
            sw.write(it->name, (uint64_t)(r0 * cols), codes.data(), (size_t)n);
            sw.write(it->name + "_scale_inv", (uint64_t)((r0 / b0) * nbc) * 4, scale.data(), (size_t)(sr * nbc) * 4);
          }
          prog.add(0, n * (it->dtype == DType::F32 ? 4 : out_sz) + (it->quant ? fp8_num_blocks(nr, b0) * nbc * 4 : 0));
        }
        prog.add(1, 0);
      }
      sw.finish();
      bytes_out += sw.bytes();
    }
  } catch (const std::exception& e) {
    lerr = e.what();
    if (lerr.empty()) lerr = "conversion failed";
  }
  prog.finish();
  agree(comm, lerr, "writing " + hf_dir);

  // every dataset against its checksum (each element was read by one rank)
  allreduce_checksums(comm, sums);
  if (rank == 0) {
    for (size_t pi = 0; pi < table.size() && err.empty(); ++pi) {
      const std::string ds = "/model/" + table[pi].name;
      const uint64_t stored = rd->stored_checksum(ds);
      if (stored != sums[pi]) {
        char b[160];
        std::snprintf(b, sizeof b, ": checksum mismatch (stored 0x%016llx, data 0x%016llx): the file is corrupt",
                      (unsigned long long)stored, (unsigned long long)sums[pi]);
        err = "checkpoint " + rd->path() + ": dataset " + ds + b;
      }
    }
    // the index and config.json, after every shard is complete
    if (err.empty()) {
      try {
        json weight_map = json::object();
        int64_t total = 0;
        for (int s = 0; s < nshards; ++s)
          for (const Item* it : shards[s]) {
            weight_map[it->name] = shard_name(s);
            if (it->quant) weight_map[it->name + "_scale_inv"] = shard_name(s);
            total += it->bytes;
          }
        write_json_file((fs::path(hf_dir) / "model.safetensors.index.json").string(),
                        json{{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}});
        json c = cj;
        c.erase("quantization_config");
        c["torch_dtype"] = fp32 ? "float32" : "bfloat16";
        if (fp8)
          c["quantization_config"] = {{"activation_scheme", "dynamic"},
                                      {"fmt", "e4m3"},
                                      {"quant_method", "fp8"},
                                      {"weight_block_size", {b0, b1}}};
        write_json_file((fs::path(hf_dir) / "config.json").string(), c);
      } catch (const std::exception& e) {
        err = e.what();
      }
    }
  }
  agree(comm, err, "writing " + hf_dir);
  ConvertStats out;
  out.tensors = (int64_t)items.size();
  for (const ParamSpec& p : table) out.params += p.numel();
  out.bytes_in = allreduce_sum(comm, bytes_in);
  out.bytes_out = allreduce_sum(comm, bytes_out);
  out.peak_buffer = allreduce_max(comm, peak);
  out.shards = nshards;
  out.seconds = now_s() - t0;
  out.path = hf_dir;
  return out;
}

}  // namespace dsv3
