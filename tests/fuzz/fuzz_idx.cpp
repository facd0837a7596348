// libFuzzer target: the Megatron .idx/.bin reader (src/io/indexed_dataset.cpp). Byte 0 picks the form:
//   even  raw: bytes 1-2 = .bin length L (little-endian), then L bytes of .bin, then the whole .idx file
//   odd   structured: byte 1 = dtype code, byte 2 = sequence count S (0-15), byte 3 = document-index count D (0-15);
//         then int32 sizes[S], int64 pointers[S], int64 doc_idx[D] taken from the next bytes (zero-padded), the
//         .idx gets a valid magic/version/counts around them, and what is left is the .bin. (Mutations then reach
//         the per-sequence and per-document checks instead of dying at the file-size check.)
// An opened dataset is read completely: every sequence, every document (whole and at an offset).
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "fuzz_common.h"
#include "io/indexed_dataset.h"

using namespace dsv3;
using dsv3_fuzz::die;
using dsv3_fuzz::expect_ok_or_error;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 4) return 0;
  const std::string_view in = dsv3_fuzz::as_view(data, size);
  std::string idx, bin;
  if ((data[0] & 1) == 0) {
    const size_t L = std::min<size_t>(data[1] | (size_t(data[2]) << 8), size - 3);
    bin = std::string(in.substr(3, L));
    idx = std::string(in.substr(3 + L));
  } else {
    const uint8_t code = data[1];
    const uint64_t s = data[2] & 15, d = data[3] & 15;
    const size_t arrays = 12 * s + 8 * d;
    std::string body(in.substr(4, arrays));
    body.resize(arrays, '\0');
    idx = std::string("MMIDIDX\0\0", 9) + dsv3_fuzz::le64(1) + std::string(1, char(code)) + dsv3_fuzz::le64(s) +
          dsv3_fuzz::le64(d) + body;
    if (size > 4 + arrays) bin = std::string(in.substr(4 + arrays));
  }
  const auto prefix = dsv3_fuzz::scratch_dir() / "tokens";
  dsv3_fuzz::write_file(prefix.string() + ".idx", idx);
  dsv3_fuzz::write_file(prefix.string() + ".bin", bin);

  expect_ok_or_error([&] {
    IndexedDataset ds(prefix.string());
    const size_t item = mmidx_dtype_size(ds.dtype());
    int64_t total = 0;
    std::vector<int64_t> buf;
    for (int64_t i = 0; i < ds.num_sequences(); ++i) {
      const int64_t len = ds.sequence_length(i), off = ds.sequence_offset(i);
      if (len < 0 || off < 0 || uint64_t(off) + uint64_t(len) * item > bin.size())
        die("accepted sequence " + std::to_string(i) + " outside the .bin");
      const std::vector<int64_t> v = ds.get(i);
      if (int64_t(v.size()) != len) die("get() length");
      total += len;
    }
    if (total != ds.total_tokens()) die("total_tokens() disagrees with the sequence lengths");
    for (int64_t d = 0; d < ds.num_documents(); ++d) {
      const int64_t len = ds.document_length(d);
      buf.assign(size_t(len) + 1, 0);
      ds.read_document(d, 0, len, buf.data());
      if (len > 0) ds.read_document(d, 1, len - 1, buf.data());
      expect_ok_or_error([&] { ds.read_document(d, 0, len + 1, buf.data()); die("read past a document's end"); });
    }
    expect_ok_or_error([&] { (void)ds.sequence_length(ds.num_sequences()); });
    expect_ok_or_error([&] { (void)ds.document_length(ds.num_documents()); });
    IndexedDataset moved(std::move(ds));
    (void)moved.num_sequences();
  });
  return 0;
}
