// defines: safetensors reader/writer (see safetensors.h)
#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <utility>

#include "core/error.h"
#include "core/numerics.h"

namespace dsv3 {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::F16: return 2;
    case DType::BF16: return 2;
    case DType::F8_E4M3: return 1;
    case DType::I64: return 8;
    case DType::I32: return 4;
  }
  DSV3_FAIL("dtype_size: invalid DType " << static_cast<int>(t));
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::F8_E4M3: return "F8_E4M3";
    case DType::I64: return "I64";
    case DType::I32: return "I32";
  }
  DSV3_FAIL("dtype_name: invalid DType " << static_cast<int>(t));
}

DType dtype_from_name(const std::string& s, const std::string& context) {
  static const DType all[] = {DType::F32, DType::F16, DType::BF16, DType::F8_E4M3, DType::I64, DType::I32};
  for (DType t : all)
    if (s == dtype_name(t)) return t;
  DSV3_FAIL(context << ": unknown dtype '" << s << "' (supported: F32, F16, BF16, F8_E4M3, I64, I32)");
}

bool dtype_is_float(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::BF16; }

// the arithmetic is core/numerics.h's, which the CUDA kernels share
float bf16_to_float(uint16_t h) { return bf16_bits_to_f32(h); }

uint16_t float_to_bf16(float f) { return f32_to_bf16_bits(f); }

float f16_to_float(uint16_t h) {
  const uint32_t sign = (h >> 15) & 1u, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  float v;
  if (exp == 0) {
    v = std::ldexp(static_cast<float>(man), -24);
  } else if (exp == 31) {
    v = man ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  } else {
    v = std::ldexp(static_cast<float>(man | 0x400u), static_cast<int>(exp) - 25);
  }
  return sign ? -v : v;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;  // validated against overflow when the view was built
  return n;
}

namespace {

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

// numel * elem_size with overflow checks; returns false on overflow.
bool checked_nbytes(const std::vector<int64_t>& shape, size_t elem, uint64_t* out) {
  uint64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return false;
    if (__builtin_mul_overflow(n, static_cast<uint64_t>(d), &n)) return false;
    if (n > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return false;
  }
  if (__builtin_mul_overflow(n, static_cast<uint64_t>(elem), &n)) return false;
  if (n > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return false;
  *out = n;
  return true;
}

// Fuzzing fix: nlohmann's dump() (in the error messages below) recurses once per nesting level, so a header nesting
// arrays a few hundred thousand deep ("shape": [[[[...]]]]) overflowed the stack. Real headers nest 3 levels deep;
// deeper ones are rejected right after parsing. Iterative, so the check itself cannot overflow.
constexpr size_t kMaxJsonDepth = 64;
bool nested_deeper_than(const nlohmann::json& j, size_t limit) {
  std::vector<std::pair<const nlohmann::json*, size_t>> todo{{&j, 0}};
  while (!todo.empty()) {
    const auto [p, depth] = todo.back();
    todo.pop_back();
    if (!p->is_structured()) continue;
    if (depth >= limit) return true;
    for (const auto& e : *p) todo.emplace_back(&e, depth + 1);
  }
  return false;
}

}  // namespace

// ---- SafetensorsFile -------------------------------------------------------------------------------

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  using nlohmann::json;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) DSV3_FAIL(path << ": cannot open safetensors file: " << std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    int e = errno;
    ::close(fd);
    DSV3_FAIL(path << ": cannot stat safetensors file: " << std::strerror(e));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    DSV3_FAIL(path << ": not a regular file");
  }
  const uint64_t fsize = static_cast<uint64_t>(st.st_size);
  if (fsize < 8) {
    ::close(fd);
    DSV3_FAIL(path << ": file is shorter than 8 bytes (" << fsize << " bytes): not a safetensors file");
  }
  void* p = ::mmap(nullptr, fsize, PROT_READ, MAP_PRIVATE, fd, 0);
  int mmap_errno = errno;
  ::close(fd);
  if (p == MAP_FAILED) DSV3_FAIL(path << ": cannot mmap safetensors file: " << std::strerror(mmap_errno));
  map_ = static_cast<uint8_t*>(p);
  map_size_ = fsize;

  try {
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; --i) hlen = (hlen << 8) | map_[i];  // little-endian
    if (hlen > fsize - 8)  // no overflow: fsize >= 8
      DSV3_FAIL(path << ": header length " << hlen << " is larger than the file (" << fsize
                     << " bytes, at most " << (fsize - 8) << " available)");
    const char* hbeg = reinterpret_cast<const char*>(map_ + 8);
    const uint8_t* data = map_ + 8 + hlen;
    const uint64_t data_size = fsize - 8 - hlen;

    json header;
    try {
      header = json::parse(hbeg, hbeg + hlen);
    } catch (const json::exception& e) {
      DSV3_FAIL(path << ": header is not valid JSON: " << e.what());
    }
    if (!header.is_object()) DSV3_FAIL(path << ": header is not a JSON object (it is " << header.type_name() << ")");
    if (nested_deeper_than(header, kMaxJsonDepth))
      DSV3_FAIL(path << ": header nests arrays/objects more than " << kMaxJsonDepth << " levels deep");

    struct Range {
      uint64_t begin, end;
      const std::string* name;
    };
    std::vector<Range> ranges;
    for (auto it = header.begin(); it != header.end(); ++it) {
      const std::string& name = it.key();
      const json& v = it.value();
      if (name == "__metadata__") {
        if (!v.is_object()) DSV3_FAIL(path << ": __metadata__ is not a JSON object (it is " << v.type_name() << ")");
        for (auto m = v.begin(); m != v.end(); ++m) {
          if (!m.value().is_string())
            DSV3_FAIL(path << ": __metadata__ value of '" << m.key() << "' is not a string (it is "
                           << m.value().type_name() << ")");
          metadata_[m.key()] = m.value().get<std::string>();
        }
        continue;
      }
      const std::string ctx = path + ": tensor '" + name + "'";
      if (!v.is_object()) DSV3_FAIL(ctx << ": entry is not a JSON object");
      for (const char* key : {"dtype", "shape", "data_offsets"})
        if (!v.contains(key)) DSV3_FAIL(ctx << ": entry is missing '" << key << "'");
      const json& jd = v["dtype"];
      const json& js = v["shape"];
      const json& jo = v["data_offsets"];
      if (!jd.is_string()) DSV3_FAIL(ctx << ": 'dtype' is not a string (it is " << jd.type_name() << ")");
      if (!js.is_array()) DSV3_FAIL(ctx << ": 'shape' is not an array (it is " << js.type_name() << ")");
      if (!jo.is_array()) DSV3_FAIL(ctx << ": 'data_offsets' is not an array (it is " << jo.type_name() << ")");

      TensorView tv;
      tv.name = name;
      tv.dtype = dtype_from_name(jd.get<std::string>(), ctx);
      for (const json& d : js) {
        if (!d.is_number_integer())
          DSV3_FAIL(ctx << ": shape entry " << d.dump() << " is not an integer");
        if (d.is_number_unsigned()) {
          uint64_t u = d.get<uint64_t>();
          if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
            DSV3_FAIL(ctx << ": shape entry " << u << " overflows int64");
          tv.shape.push_back(static_cast<int64_t>(u));
        } else {
          int64_t s = d.get<int64_t>();
          if (s < 0) DSV3_FAIL(ctx << ": negative dimension " << s << " in shape " << js.dump());
          tv.shape.push_back(s);
        }
      }
      uint64_t nbytes = 0;
      if (!checked_nbytes(tv.shape, dtype_size(tv.dtype), &nbytes))
        DSV3_FAIL(ctx << ": shape " << shape_str(tv.shape) << " x " << dtype_size(tv.dtype)
                      << " bytes overflows (byte size does not fit in int64)");
      if (jo.size() != 2 || !jo[0].is_number_unsigned() || !jo[1].is_number_unsigned())
        DSV3_FAIL(ctx << ": data_offsets " << jo.dump() << " is not [begin, end] of two non-negative integers");
      const uint64_t b = jo[0].get<uint64_t>(), e = jo[1].get<uint64_t>();
      if (b > e) DSV3_FAIL(ctx << ": data_offsets [" << b << ", " << e << "] has begin > end");
      if (e > data_size)
        DSV3_FAIL(ctx << ": data_offsets end " << e << " is beyond the data section (" << data_size << " bytes)");
      if (e - b != nbytes)
        DSV3_FAIL(ctx << ": data_offsets [" << b << ", " << e << "] span " << (e - b) << " bytes, which does not match "
                      << dtype_name(tv.dtype) << " shape " << shape_str(tv.shape) << " (" << nbytes << " bytes)");
      tv.data = data + b;
      tv.nbytes = static_cast<size_t>(nbytes);
      auto [pos, inserted] = tensors_.emplace(name, std::move(tv));
      (void)inserted;  // nlohmann objects have unique keys
      ranges.push_back({b, e, &pos->first});
    }

    // The tensors must cover the data section exactly: no overlap, no gap, no trailing bytes.
    std::sort(ranges.begin(), ranges.end(), [](const Range& x, const Range& y) {
      return x.begin != y.begin ? x.begin < y.begin : x.end < y.end;
    });
    uint64_t cursor = 0;
    const std::string* prev = nullptr;
    for (const Range& r : ranges) {
      if (r.begin < cursor)
        DSV3_FAIL(path << ": tensor '" << *r.name << "' [" << r.begin << ", " << r.end << ") overlaps tensor '"
                       << *prev << "' (which ends at " << cursor << ")");
      if (r.begin > cursor)
        DSV3_FAIL(path << ": gap in the data section: bytes [" << cursor << ", " << r.begin
                       << ") belong to no tensor (before tensor '" << *r.name << "')");
      cursor = r.end;
      prev = r.name;
    }
    if (cursor != data_size)
      DSV3_FAIL(path << ": data section is " << data_size << " bytes but the tensors end at " << cursor << " ("
                     << (data_size - cursor) << " trailing bytes belong to no tensor)");
  } catch (...) {
    release();
    throw;
  }
}

void SafetensorsFile::release() noexcept {
  if (map_) ::munmap(map_, map_size_);
  map_ = nullptr;
  map_size_ = 0;
}

SafetensorsFile::~SafetensorsFile() { release(); }

SafetensorsFile::SafetensorsFile(SafetensorsFile&& o) noexcept
    : path_(std::move(o.path_)),
      map_(o.map_),
      map_size_(o.map_size_),
      tensors_(std::move(o.tensors_)),
      metadata_(std::move(o.metadata_)) {
  o.map_ = nullptr;
  o.map_size_ = 0;
}

SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&& o) noexcept {
  if (this != &o) {
    release();
    path_ = std::move(o.path_);
    map_ = o.map_;
    map_size_ = o.map_size_;
    tensors_ = std::move(o.tensors_);
    metadata_ = std::move(o.metadata_);
    o.map_ = nullptr;
    o.map_size_ = 0;
  }
  return *this;
}

const TensorView& SafetensorsFile::get(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) DSV3_FAIL(path_ << ": no tensor '" << name << "' in this file");
  return it->second;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> r;
  r.reserve(tensors_.size());
  for (const auto& kv : tensors_) r.push_back(kv.first);
  return r;  // std::map: already sorted
}

void SafetensorsFile::to_f32_into(const std::string& name, float* dst) const {
  const TensorView& v = get(name);
  const int64_t n = v.numel();
  switch (v.dtype) {
    case DType::F32:
      if (n) std::memcpy(dst, v.data, static_cast<size_t>(n) * 4);
      return;
    case DType::BF16:
    case DType::F16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, v.data + 2 * i, 2);
        dst[i] = v.dtype == DType::BF16 ? bf16_to_float(h) : f16_to_float(h);
      }
      return;
    default:
      DSV3_FAIL(path_ << ": tensor '" << name << "' is " << dtype_name(v.dtype)
                      << ", not F32/F16/BF16 (F8_E4M3 needs its scale_inv: use HfCheckpoint::load_f32)");
  }
}

std::vector<float> SafetensorsFile::to_f32(const std::string& name) const {
  const TensorView& v = get(name);
  if (!dtype_is_float(v.dtype)) to_f32_into(name, nullptr);  // throws the dtype error
  std::vector<float> r(static_cast<size_t>(v.numel()));
  to_f32_into(name, r.data());
  return r;
}

std::vector<int64_t> SafetensorsFile::to_i64(const std::string& name) const {
  const TensorView& v = get(name);
  const int64_t n = v.numel();
  std::vector<int64_t> r(static_cast<size_t>(n));
  if (v.dtype == DType::I64) {
    if (n) std::memcpy(r.data(), v.data, static_cast<size_t>(n) * 8);
  } else if (v.dtype == DType::I32) {
    for (int64_t i = 0; i < n; ++i) {
      int32_t x;
      std::memcpy(&x, v.data + 4 * i, 4);
      r[i] = x;
    }
  } else {
    DSV3_FAIL(path_ << ": tensor '" << name << "' is " << dtype_name(v.dtype) << ", not I64/I32");
  }
  return r;
}

// ---- SafetensorsWriter -----------------------------------------------------------------------------

void SafetensorsWriter::add(const std::string& name, DType dtype, std::vector<int64_t> shape, const void* data,
                            size_t nbytes) {
  DSV3_CHECK(!name.empty() && name != "__metadata__", "safetensors writer: invalid tensor name '" << name << "'");
  DSV3_CHECK(!entries_.count(name), "safetensors writer: tensor '" << name << "' added twice");
  uint64_t expect = 0;
  DSV3_CHECK(checked_nbytes(shape, dtype_size(dtype), &expect),
             "safetensors writer: tensor '" << name << "' has an invalid shape " << shape_str(shape));
  DSV3_CHECK(expect == nbytes, "safetensors writer: tensor '" << name << "' " << dtype_name(dtype) << " shape "
                                                              << shape_str(shape) << " needs " << expect
                                                              << " bytes, got " << nbytes);
  DSV3_CHECK(nbytes == 0 || data != nullptr, "safetensors writer: tensor '" << name << "' has null data");
  Entry e{dtype, std::move(shape), {}};
  if (nbytes) e.bytes.assign(static_cast<const uint8_t*>(data), static_cast<const uint8_t*>(data) + nbytes);
  entries_.emplace(name, std::move(e));
}

void SafetensorsWriter::add_f32(const std::string& name, std::vector<int64_t> shape, const float* data) {
  uint64_t nbytes = 0;
  DSV3_CHECK(checked_nbytes(shape, 4, &nbytes),
             "safetensors writer: tensor '" << name << "' has an invalid shape " << shape_str(shape));
  add(name, DType::F32, std::move(shape), data, static_cast<size_t>(nbytes));
}

void SafetensorsWriter::write(const std::string& path, const std::map<std::string, std::string>& metadata) const {
  using nlohmann::json;
  json header = json::object();
  if (!metadata.empty()) {
    json m = json::object();
    for (const auto& kv : metadata) m[kv.first] = kv.second;
    header["__metadata__"] = m;
  }
  uint64_t off = 0;
  for (const auto& [name, e] : entries_) {  // sorted names
    json t = json::object();
    t["dtype"] = dtype_name(e.dtype);
    t["shape"] = e.shape;
    t["data_offsets"] = {off, off + e.bytes.size()};
    header[name] = t;
    off += e.bytes.size();
  }
  std::string h = header.dump();
  while ((8 + h.size()) % 8 != 0) h.push_back(' ');

  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) DSV3_FAIL(tmp << ": cannot open for writing: " << std::strerror(errno));
    uint8_t len[8];
    uint64_t n = h.size();
    for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(n >> (8 * i));
    f.write(reinterpret_cast<const char*>(len), 8);
    f.write(h.data(), static_cast<std::streamsize>(h.size()));
    for (const auto& kv : entries_)
      if (!kv.second.bytes.empty())
        f.write(reinterpret_cast<const char*>(kv.second.bytes.data()),
                static_cast<std::streamsize>(kv.second.bytes.size()));
    f.flush();
    if (!f) {
      f.close();
      std::remove(tmp.c_str());
      DSV3_FAIL(tmp << ": write failed (disk full?)");
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    int e = errno;
    std::remove(tmp.c_str());
    DSV3_FAIL(path << ": cannot rename " << tmp << " onto it: " << std::strerror(e));
  }
}

}  // namespace dsv3
