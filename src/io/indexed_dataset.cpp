// Megatron-LM MMIDIDX reader and writer; see indexed_dataset.h for the format.
#include "io/indexed_dataset.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <utility>

#include "core/error.h"

namespace dsv3 {

namespace {

constexpr char kMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};
constexpr size_t kHeader = 9 + 8 + 1 + 8 + 8;  // magic, version, dtype, sequence count, document count

template <class T>
T load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

// Maps a whole file read-only. A 0-byte file maps to nullptr with size 0.
uint8_t* map_file(const std::string& path, size_t* size) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  DSV3_CHECK(fd >= 0, path << ": cannot open (" << std::strerror(errno) << ")");
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int e = errno;
    ::close(fd);
    DSV3_FAIL(path << ": cannot stat (" << std::strerror(e) << ")");
  }
  *size = static_cast<size_t>(st.st_size);
  if (*size == 0) {
    ::close(fd);
    return nullptr;
  }
  void* m = ::mmap(nullptr, *size, PROT_READ, MAP_SHARED, fd, 0);
  const int e = errno;
  ::close(fd);
  DSV3_CHECK(m != MAP_FAILED, path << ": cannot mmap (" << std::strerror(e) << ")");
  return static_cast<uint8_t*>(m);
}

bool valid_code(uint8_t c) { return c >= 1 && c <= 8; }

}  // namespace

size_t mmidx_dtype_size(MmidxDtype d) {
  switch (d) {
    case MmidxDtype::U8: case MmidxDtype::I8: return 1;
    case MmidxDtype::I16: case MmidxDtype::U16: return 2;
    case MmidxDtype::I32: case MmidxDtype::F32: return 4;
    case MmidxDtype::I64: case MmidxDtype::F64: return 8;
  }
  DSV3_FAIL("unknown MMIDIDX dtype code " << (int)d);
}

const char* mmidx_dtype_name(MmidxDtype d) {
  switch (d) {
    case MmidxDtype::U8: return "uint8";
    case MmidxDtype::I8: return "int8";
    case MmidxDtype::I16: return "int16";
    case MmidxDtype::I32: return "int32";
    case MmidxDtype::I64: return "int64";
    case MmidxDtype::F64: return "float64";
    case MmidxDtype::F32: return "float32";
    case MmidxDtype::U16: return "uint16";
  }
  return "?";
}

MmidxDtype mmidx_dtype_for_vocab(int64_t vocab_size) {
  return vocab_size < 65500 ? MmidxDtype::U16 : MmidxDtype::I32;
}

// ---- reader ----------------------------------------------------------------------------------------

IndexedDataset::IndexedDataset(const std::string& prefix) : prefix_(prefix) {
  const std::string idx = prefix + ".idx", bin = prefix + ".bin";
  try {
    idx_map_ = map_file(idx, &idx_size_);
    DSV3_CHECK(idx_size_ >= kHeader, idx << ": truncated header (" << idx_size_ << " bytes, need " << kHeader << ")");
    DSV3_CHECK(std::memcmp(idx_map_, kMagic, 9) == 0, idx << ": bad magic (not a Megatron MMIDIDX index)");
    const uint64_t version = load<uint64_t>(idx_map_ + 9);
    DSV3_CHECK(version == 1, idx << ": unsupported version " << version << " (expected 1)");
    const uint8_t code = idx_map_[17];
    DSV3_CHECK(valid_code(code), idx << ": unknown dtype code " << (int)code);
    dtype_ = static_cast<MmidxDtype>(code);
    DSV3_CHECK(dtype_ != MmidxDtype::F32 && dtype_ != MmidxDtype::F64,
               idx << ": dtype " << mmidx_dtype_name(dtype_) << " (code " << (int)code << ") is not a token type");
    const uint64_t s = load<uint64_t>(idx_map_ + 18), d = load<uint64_t>(idx_map_ + 26);
    // 12 bytes per sequence + 8 per document boundary; bound the counts before multiplying
    DSV3_CHECK(s <= idx_size_ / 12 && d <= idx_size_ / 8,
               idx << ": truncated or corrupt: sequence count " << s << " and document count " << d
                   << " need more than the file's " << idx_size_ << " bytes");
    const uint64_t need = kHeader + 12 * s + 8 * d;
    DSV3_CHECK(idx_size_ >= need, idx << ": truncated: " << s << " sequences and " << d << " document indices need "
                                      << need << " bytes, file has " << idx_size_);
    DSV3_CHECK(idx_size_ == need, idx << ": " << idx_size_ - need << " trailing bytes after the document indices");
    DSV3_CHECK(d >= 1, idx << ": no document indices (need at least the leading 0)");
    n_seq_ = static_cast<int64_t>(s);
    n_doc_idx_ = static_cast<int64_t>(d);
    sizes_ = idx_map_ + kHeader;
    pointers_ = sizes_ + 4 * s;
    doc_idx_ = pointers_ + 8 * s;

    bin_map_ = map_file(bin, &bin_size_);
    const int64_t item = static_cast<int64_t>(mmidx_dtype_size(dtype_));
    for (int64_t i = 0; i < n_seq_; ++i) {
      const int64_t len = load<int32_t>(sizes_ + 4 * i), off = load<int64_t>(pointers_ + 8 * i);
      DSV3_CHECK(len >= 0, idx << ": sequence " << i << " has negative length " << len);
      DSV3_CHECK(off >= 0 && off % item == 0,
                 idx << ": sequence " << i << " has bad byte offset " << off << " (dtype " << mmidx_dtype_name(dtype_) << ")");
      DSV3_CHECK(off <= (int64_t)bin_size_ && len * item <= (int64_t)bin_size_ - off,
                 idx << ": sequence " << i << " (offset " << off << ", " << len << " tokens) lies beyond the end of "
                     << bin << " (" << bin_size_ << " bytes)");
      total_tokens_ += len;
    }
    int64_t prev = 0;
    for (int64_t k = 0; k < n_doc_idx_; ++k) {
      const int64_t v = load<int64_t>(doc_idx_ + 8 * k);
      if (k == 0) DSV3_CHECK(v == 0, idx << ": document index 0 is " << v << " (must start at 0)");
      DSV3_CHECK(v >= prev, idx << ": document indices not monotone (index " << k << " is " << v << " after " << prev << ")");
      DSV3_CHECK(v <= n_seq_, idx << ": document index " << k << " is " << v << " > sequence count " << n_seq_);
      prev = v;
    }
    DSV3_CHECK(prev == n_seq_, idx << ": last document index is " << prev << ", must equal the sequence count " << n_seq_);
  } catch (...) {
    release();
    throw;
  }
}

IndexedDataset::~IndexedDataset() { release(); }

void IndexedDataset::release() noexcept {
  if (idx_map_) ::munmap(idx_map_, idx_size_);
  if (bin_map_) ::munmap(bin_map_, bin_size_);
  idx_map_ = bin_map_ = nullptr;
  idx_size_ = bin_size_ = 0;
}

IndexedDataset::IndexedDataset(IndexedDataset&& o) noexcept { *this = std::move(o); }

IndexedDataset& IndexedDataset::operator=(IndexedDataset&& o) noexcept {
  if (this != &o) {
    release();
    prefix_ = std::move(o.prefix_);
    dtype_ = o.dtype_;
    n_seq_ = o.n_seq_;
    n_doc_idx_ = o.n_doc_idx_;
    total_tokens_ = o.total_tokens_;
    idx_map_ = std::exchange(o.idx_map_, nullptr);
    idx_size_ = std::exchange(o.idx_size_, 0);
    bin_map_ = std::exchange(o.bin_map_, nullptr);
    bin_size_ = std::exchange(o.bin_size_, 0);
    sizes_ = o.sizes_;
    pointers_ = o.pointers_;
    doc_idx_ = o.doc_idx_;
  }
  return *this;
}

int64_t IndexedDataset::sequence_length(int64_t i) const {
  DSV3_CHECK(i >= 0 && i < n_seq_, prefix_ << ".idx: sequence " << i << " out of range [0, " << n_seq_ << ")");
  return load<int32_t>(sizes_ + 4 * i);
}

int64_t IndexedDataset::sequence_offset(int64_t i) const {
  DSV3_CHECK(i >= 0 && i < n_seq_, prefix_ << ".idx: sequence " << i << " out of range [0, " << n_seq_ << ")");
  return load<int64_t>(pointers_ + 8 * i);
}

int64_t IndexedDataset::document_index(int64_t d) const {
  DSV3_CHECK(d >= 0 && d < n_doc_idx_, prefix_ << ".idx: document " << d << " out of range [0, " << n_doc_idx_ << ")");
  return load<int64_t>(doc_idx_ + 8 * d);
}

int64_t IndexedDataset::document_length(int64_t d) const {
  DSV3_CHECK(d >= 0 && d < num_documents(), prefix_ << ".idx: document " << d << " out of range [0, " << num_documents() << ")");
  int64_t n = 0;
  for (int64_t s = document_index(d), e = document_index(d + 1); s < e; ++s) n += load<int32_t>(sizes_ + 4 * s);
  return n;
}

void IndexedDataset::read(int64_t i, int64_t offset, int64_t n, int64_t* out) const {
  const int64_t len = sequence_length(i);
  DSV3_CHECK(offset >= 0 && n >= 0 && offset + n <= len,
             prefix_ << ".bin: tokens [" << offset << ", " << offset + n << ") of sequence " << i << " out of range (length "
                     << len << ")");
  const uint8_t* p = bin_map_ + load<int64_t>(pointers_ + 8 * i) + offset * (int64_t)mmidx_dtype_size(dtype_);
  switch (dtype_) {
    case MmidxDtype::U8: for (int64_t k = 0; k < n; ++k) out[k] = p[k]; break;
    case MmidxDtype::I8: for (int64_t k = 0; k < n; ++k) out[k] = static_cast<int8_t>(p[k]); break;
    case MmidxDtype::I16: for (int64_t k = 0; k < n; ++k) out[k] = load<int16_t>(p + 2 * k); break;
    case MmidxDtype::U16: for (int64_t k = 0; k < n; ++k) out[k] = load<uint16_t>(p + 2 * k); break;
    case MmidxDtype::I32: for (int64_t k = 0; k < n; ++k) out[k] = load<int32_t>(p + 4 * k); break;
    case MmidxDtype::I64: if (n) std::memcpy(out, p, 8 * n); break;
    default: DSV3_FAIL(prefix_ << ".idx: dtype " << mmidx_dtype_name(dtype_) << " is not a token type");
  }
}

std::vector<int64_t> IndexedDataset::get(int64_t i) const {
  std::vector<int64_t> v(sequence_length(i));
  read(i, 0, (int64_t)v.size(), v.data());
  return v;
}

void IndexedDataset::read_document(int64_t d, int64_t offset, int64_t n, int64_t* out) const {
  DSV3_CHECK(d >= 0 && d < num_documents(), prefix_ << ".idx: document " << d << " out of range [0, " << num_documents() << ")");
  DSV3_CHECK(offset >= 0 && n >= 0, prefix_ << ": bad token range of document " << d);
  const int64_t first = document_index(d), last = document_index(d + 1);
  if (last - first == 1) return read(first, offset, n, out);  // the usual case: one sequence per document
  for (int64_t s = first; s < last && n > 0; ++s) {
    const int64_t len = sequence_length(s);
    if (offset >= len) {
      offset -= len;
      continue;
    }
    const int64_t take = std::min(n, len - offset);
    read(s, offset, take, out);
    out += take;
    n -= take;
    offset = 0;
  }
  DSV3_CHECK(n == 0, prefix_ << ".bin: token range beyond the end of document " << d);
}

// ---- writer ----------------------------------------------------------------------------------------

IndexedDatasetBuilder::IndexedDatasetBuilder(const std::string& prefix, MmidxDtype dtype) : prefix_(prefix), dtype_(dtype) {
  DSV3_CHECK(valid_code((uint8_t)dtype) && dtype != MmidxDtype::F32 && dtype != MmidxDtype::F64,
             prefix << ".bin: dtype code " << (int)dtype << " is not a token type");
  bin_.open(prefix + ".bin", std::ios::binary | std::ios::trunc);
  DSV3_CHECK(bin_.good(), prefix << ".bin: cannot open for writing (" << std::strerror(errno) << ")");
}

IndexedDatasetBuilder IndexedDatasetBuilder::for_vocab(const std::string& prefix, int64_t vocab_size) {
  DSV3_CHECK(vocab_size >= 1, prefix << ": vocabulary size " << vocab_size << " must be >= 1");
  IndexedDatasetBuilder b(prefix, mmidx_dtype_for_vocab(vocab_size));
  b.limit_ = vocab_size;
  return b;
}

IndexedDatasetBuilder::~IndexedDatasetBuilder() {
  if (!finalized_ && bin_.is_open()) {  // abandoned (an error): leave no partial dataset behind
    bin_.close();
    std::remove((prefix_ + ".bin").c_str());
  }
}

void IndexedDatasetBuilder::add_sequence(std::span<const int64_t> tokens) {
  DSV3_CHECK(!finalized_, prefix_ << ": builder already finalized");
  DSV3_CHECK(tokens.size() <= (size_t)std::numeric_limits<int32_t>::max(),
             prefix_ << ".bin: sequence of " << tokens.size() << " tokens is longer than int32 allows");
  int64_t lo = 0, hi = 0;
  switch (dtype_) {
    case MmidxDtype::U8: hi = 255; break;
    case MmidxDtype::I8: lo = -128; hi = 127; break;
    case MmidxDtype::I16: lo = -32768; hi = 32767; break;
    case MmidxDtype::U16: hi = 65535; break;
    case MmidxDtype::I32: lo = std::numeric_limits<int32_t>::min(); hi = std::numeric_limits<int32_t>::max(); break;
    default: lo = std::numeric_limits<int64_t>::min(); hi = std::numeric_limits<int64_t>::max(); break;
  }
  if (limit_ > 0) {
    lo = 0;
    hi = std::min(hi, limit_ - 1);
  }
  const size_t item = mmidx_dtype_size(dtype_);
  buf_.resize(tokens.size() * item);
  for (size_t k = 0; k < tokens.size(); ++k) {
    const int64_t t = tokens[k];
    DSV3_CHECK(t >= lo && t <= hi, prefix_ << ".bin: token " << t << " of sequence " << sizes_.size() << " outside [" << lo
                                           << ", " << hi << "] (" << mmidx_dtype_name(dtype_) << ")");
    switch (item) {  // little-endian host (x86-64/aarch64)
      case 1: buf_[k] = static_cast<uint8_t>(t); break;
      case 2: { const uint16_t v = static_cast<uint16_t>(t); std::memcpy(&buf_[2 * k], &v, 2); break; }
      case 4: { const int32_t v = static_cast<int32_t>(t); std::memcpy(&buf_[4 * k], &v, 4); break; }
      default: std::memcpy(&buf_[8 * k], &t, 8); break;
    }
  }
  bin_.write(reinterpret_cast<const char*>(buf_.data()), static_cast<std::streamsize>(buf_.size()));
  DSV3_CHECK(bin_.good(), prefix_ << ".bin: write failed (" << std::strerror(errno) << ")");
  sizes_.push_back(static_cast<int32_t>(tokens.size()));
  n_tokens_ += static_cast<int64_t>(tokens.size());
}

void IndexedDatasetBuilder::end_document() {
  DSV3_CHECK(!finalized_, prefix_ << ": builder already finalized");
  doc_idx_.push_back(static_cast<int64_t>(sizes_.size()));
}

void IndexedDatasetBuilder::add_document(std::span<const int64_t> tokens) {
  add_sequence(tokens);
  end_document();
}

void IndexedDatasetBuilder::finalize() {
  DSV3_CHECK(!finalized_, prefix_ << ": builder already finalized");
  if (doc_idx_.back() != (int64_t)sizes_.size()) end_document();  // close a trailing open document
  bin_.close();
  DSV3_CHECK(!bin_.fail(), prefix_ << ".bin: close failed");
  const std::string idx = prefix_ + ".idx";
  std::ofstream f(idx, std::ios::binary | std::ios::trunc);
  DSV3_CHECK(f.good(), idx << ": cannot open for writing (" << std::strerror(errno) << ")");
  auto put = [&f](const void* p, size_t n) { f.write(static_cast<const char*>(p), static_cast<std::streamsize>(n)); };
  const uint64_t version = 1, s = sizes_.size(), d = doc_idx_.size();
  const uint8_t code = static_cast<uint8_t>(dtype_);
  put(kMagic, 9);
  put(&version, 8);
  put(&code, 1);
  put(&s, 8);
  put(&d, 8);
  put(sizes_.data(), 4 * s);
  std::vector<int64_t> pointers(s);
  int64_t off = 0;
  for (size_t i = 0; i < s; ++i) {
    pointers[i] = off;
    off += int64_t(sizes_[i]) * (int64_t)mmidx_dtype_size(dtype_);
  }
  put(pointers.data(), 8 * s);
  put(doc_idx_.data(), 8 * d);
  f.close();
  DSV3_CHECK(!f.fail(), idx << ": write failed");
  finalized_ = true;
}

}  // namespace dsv3
