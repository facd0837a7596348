// dsv3-preprocess: JSONL corpus -> Megatron .bin/.idx token files.
//   dsv3-preprocess --input corpus.jsonl --tokenizer tokenizer.json --output-prefix PREFIX
//                   [--append-eod] [--workers N] [--json-key text]
// Each non-blank line is a JSON object whose "text" string is one document. Writes PREFIX.bin and PREFIX.idx
// (uint16 tokens when the vocabulary has < 65500 entries, else int32, as Megatron), a progress line on
// stderr, and a summary on stdout. A line that is not such an object is an error naming file:line.
#include <omp.h>

#include <chrono>
#include <cstdio>
#include <exception>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include <boost/program_options.hpp>

#include "core/error.h"
#include "data/tokenizer.h"
#include "io/indexed_dataset.h"

using namespace dsv3;
namespace po = boost::program_options;

int main(int argc, char** argv) {
  try {
    po::options_description opts("dsv3-preprocess --input FILE.jsonl --tokenizer tokenizer.json --output-prefix PREFIX");
    opts.add_options()("help,h", "print this help")("input", po::value<std::string>(), "JSONL corpus, one {\"text\": ...} per line")(
        "tokenizer", po::value<std::string>(), "Hugging Face tokenizer.json (byte-level BPE)")(
        "output-prefix", po::value<std::string>(), "writes PREFIX.bin and PREFIX.idx")(
        "append-eod", po::bool_switch(), "append the end-of-document token to every document")(
        "eod-token", po::value<std::string>()->default_value(kEosToken), "the end-of-document token's text")(
        "json-key", po::value<std::string>()->default_value("text"), "the key of the document text")(
        "workers", po::value<int>()->default_value(1), "tokenizer threads");
    po::variables_map vm;
    po::store(po::parse_command_line(argc, argv, opts), vm);
    po::notify(vm);
    if (vm.count("help")) {
      std::cout << opts << "\n";
      return 0;
    }
    for (const char* k : {"input", "tokenizer", "output-prefix"})
      DSV3_CHECK(vm.count(k), "--" << k << " is required (see --help)");
    const std::string input = vm["input"].as<std::string>(), prefix = vm["output-prefix"].as<std::string>();
    const std::string key = vm["json-key"].as<std::string>();
    const int workers = vm["workers"].as<int>();
    DSV3_CHECK(workers >= 1, "--workers must be >= 1 (got " << workers << ")");
    const Tokenizer tok = Tokenizer::load(vm["tokenizer"].as<std::string>());
    int64_t eod = -1;
    if (vm["append-eod"].as<bool>()) {
      const auto id = tok.token_to_id(vm["eod-token"].as<std::string>());
      DSV3_CHECK(id, vm["tokenizer"].as<std::string>() << ": no token '" << vm["eod-token"].as<std::string>()
                                                        << "' for --append-eod (see --eod-token)");
      eod = *id;
    }
    std::ifstream in(input, std::ios::binary);
    DSV3_CHECK(in.good(), input << ": cannot open");
    in.seekg(0, std::ios::end);
    const double in_bytes = std::max<double>(1.0, (double)in.tellg());
    in.seekg(0);
    auto builder = IndexedDatasetBuilder::for_vocab(prefix, tok.vocab_size());

    const auto t0 = std::chrono::steady_clock::now();
    auto last = t0;
    const size_t batch = 1024;
    std::vector<std::string> lines;
    std::vector<int64_t> line_no;
    std::vector<std::vector<int64_t>> ids;
    std::vector<std::string> errors;
    int64_t n_line = 0, n_doc = 0, n_tok = 0;
    double done_bytes = 0;
    std::string line;
    bool eof = false;
    while (!eof) {
      lines.clear();
      line_no.clear();
      while (lines.size() < batch) {
        if (!std::getline(in, line)) {
          eof = true;
          break;
        }
        ++n_line;
        done_bytes += (double)line.size() + 1;
        if (line.find_first_not_of(" \t\r") == std::string::npos) continue;  // blank lines are skipped
        lines.push_back(std::move(line));
        line_no.push_back(n_line);
      }
      const int64_t n = (int64_t)lines.size();
      ids.assign(n, {});
      errors.assign(n, {});
#pragma omp parallel for num_threads(workers) schedule(dynamic, 8)
      for (int64_t i = 0; i < n; ++i) {
        try {
          nlohmann::json j;
          try {
            j = nlohmann::json::parse(lines[i]);
          } catch (const nlohmann::json::exception& e) {
            errors[i] = std::string("not valid JSON (") + e.what() + ")";
            continue;
          }
          if (!j.is_object() || !j.contains(key) || !j[key].is_string()) {
            errors[i] = "expected a JSON object with a string \"" + key + "\"";
            continue;
          }
          ids[i] = tok.encode(j[key].get<std::string>());
          if (eod >= 0) ids[i].push_back(eod);
        } catch (const std::exception& e) {
          errors[i] = e.what();
        }
      }
      for (int64_t i = 0; i < n; ++i) {
        DSV3_CHECK(errors[i].empty(), input << ":" << line_no[i] << ": " << errors[i]);
        builder.add_document(ids[i]);
        ++n_doc;
        n_tok += (int64_t)ids[i].size();
      }
      const auto now = std::chrono::steady_clock::now();
      if (std::chrono::duration<double>(now - last).count() >= 1.0 || eof) {
        const double sec = std::max(1e-9, std::chrono::duration<double>(now - t0).count());
        std::fprintf(stderr, "dsv3-preprocess: %5.1f%%  %lld documents  %lld tokens  %.2f MB/s\n", 100.0 * done_bytes / in_bytes,
                     (long long)n_doc, (long long)n_tok, done_bytes / 1e6 / sec);
        std::fflush(stderr);
        last = now;
      }
    }
    builder.finalize();
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("dsv3-preprocess: %s -> %s.bin/.idx: %lld documents, %lld tokens (%s), %.2f s\n", input.c_str(),
                prefix.c_str(), (long long)n_doc, (long long)n_tok,
                mmidx_dtype_name(mmidx_dtype_for_vocab(tok.vocab_size())), sec);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dsv3-preprocess: error: %s\n", e.what());
    return 2;
  }
}
