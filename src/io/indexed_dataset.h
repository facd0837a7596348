// defines: dsv3::IndexedDataset (validating mmap reader of Megatron-LM's .bin/.idx "MMIDIDX" token files),
//          dsv3::IndexedDatasetBuilder (writer), dsv3::mmidx_dtype_* helpers
// Format (Megatron-LM megatron/core/datasets/indexed_dataset.py, little-endian):
//   .idx: magic "MMIDIDX\0\0" (9 bytes), version uint64 = 1, dtype code uint8 (1 uint8, 2 int8, 3 int16,
//         4 int32, 5 int64, 6 float64, 7 float32, 8 uint16), sequence count S uint64, document count D uint64,
//         int32 sequence lengths [S], int64 byte offsets into .bin [S], int64 document indices [D]
//         (sequence-index boundaries: 0, ..., S; document d is sequences [idx[d], idx[d+1]))
//   .bin: the token arrays of the sequences, concatenated, in that dtype.
// Both files are memory-mapped; the arrays in the .idx are not aligned, so they are read with memcpy.
#pragma once
#include <cstddef>
#include <cstdint>
#include <fstream>
#include <span>
#include <string>
#include <vector>

namespace dsv3 {

// Megatron dtype codes. Token files use uint16 (vocab < 65500) or int32, as Megatron chooses.
enum class MmidxDtype : uint8_t { U8 = 1, I8 = 2, I16 = 3, I32 = 4, I64 = 5, F64 = 6, F32 = 7, U16 = 8 };
size_t mmidx_dtype_size(MmidxDtype);
const char* mmidx_dtype_name(MmidxDtype);  // "uint8", ..., "uint16"
MmidxDtype mmidx_dtype_for_vocab(int64_t vocab_size);  // U16 when vocab_size < 65500, else I32 (Megatron)

class IndexedDataset {  // read-only; non-copyable, movable
 public:
  // Opens prefix.idx and prefix.bin and validates everything (magic, version, dtype, counts vs the file
  // size, every sequence inside the .bin, document indices 0 = idx[0] <= ... <= idx[D-1] = S).
  // Errors are one line: "<file>: <what is wrong>".
  explicit IndexedDataset(const std::string& prefix);
  ~IndexedDataset();
  IndexedDataset(const IndexedDataset&) = delete;
  IndexedDataset& operator=(const IndexedDataset&) = delete;
  IndexedDataset(IndexedDataset&& o) noexcept;
  IndexedDataset& operator=(IndexedDataset&& o) noexcept;

  const std::string& prefix() const { return prefix_; }
  MmidxDtype dtype() const { return dtype_; }
  int64_t num_sequences() const { return n_seq_; }
  int64_t num_documents() const { return n_doc_idx_ - 1; }  // the .idx stores D = documents + 1 boundaries
  int64_t sequence_length(int64_t i) const;                 // tokens of sequence i
  int64_t sequence_offset(int64_t i) const;                 // byte offset of sequence i in the .bin
  int64_t document_index(int64_t d) const;                  // d in [0, num_documents()]: first sequence of d
  int64_t document_length(int64_t d) const;                 // tokens of document d (all its sequences)
  int64_t total_tokens() const { return total_tokens_; }

  // Tokens [offset, offset + n) of sequence i, converted to int64, into out[0..n).
  void read(int64_t i, int64_t offset, int64_t n, int64_t* out) const;
  std::vector<int64_t> get(int64_t i) const;  // the whole sequence i
  // Tokens [offset, offset + n) of document d (its sequences concatenated) into out.
  void read_document(int64_t d, int64_t offset, int64_t n, int64_t* out) const;

 private:
  void release() noexcept;
  std::string prefix_;
  MmidxDtype dtype_ = MmidxDtype::U16;
  int64_t n_seq_ = 0, n_doc_idx_ = 0, total_tokens_ = 0;
  uint8_t* idx_map_ = nullptr;
  size_t idx_size_ = 0;
  uint8_t* bin_map_ = nullptr;
  size_t bin_size_ = 0;
  const uint8_t* sizes_ = nullptr;     // int32[S]   (unaligned)
  const uint8_t* pointers_ = nullptr;  // int64[S]
  const uint8_t* doc_idx_ = nullptr;   // int64[D]
};

// Writes prefix.bin while documents are added and prefix.idx at finalize(). Every token is checked
// against the dtype's range. Megatron-compatible: the files load with Megatron's IndexedDataset.
class IndexedDatasetBuilder {
 public:
  IndexedDatasetBuilder(const std::string& prefix, MmidxDtype dtype);
  // dtype from the vocabulary size (uint16 when < 65500, else int32); tokens must be < vocab_size.
  static IndexedDatasetBuilder for_vocab(const std::string& prefix, int64_t vocab_size);
  ~IndexedDatasetBuilder();  // an unfinalized builder (an error happened) removes its partial .bin
  IndexedDatasetBuilder(IndexedDatasetBuilder&&) = default;
  IndexedDatasetBuilder& operator=(IndexedDatasetBuilder&&) = default;

  void add_document(std::span<const int64_t> tokens);  // one sequence that is a whole document
  void add_sequence(std::span<const int64_t> tokens);  // a sequence of the current document ...
  void end_document();                                 // ... which this closes
  void finalize();                                     // writes prefix.idx; the builder is then closed
  int64_t num_documents() const { return (int64_t)doc_idx_.size() - 1; }
  int64_t num_tokens() const { return n_tokens_; }

 private:
  std::string prefix_;
  MmidxDtype dtype_;
  int64_t limit_ = -1;  // tokens must be < limit_ (-1: the dtype's range only)
  std::ofstream bin_;
  std::vector<int32_t> sizes_;
  std::vector<int64_t> doc_idx_{0};
  int64_t n_tokens_ = 0;
  bool finalized_ = false;
  std::vector<uint8_t> buf_;
};

}  // namespace dsv3
