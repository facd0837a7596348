// dsv3-train-tokenizer: trains a byte-level BPE tokenizer in DeepSeek-V3's tokenizer.json format.
//   dsv3-train-tokenizer --input corpus.jsonl --vocab-size N --output tokenizer.json
//                        [--special-tokens A,B,...] [--min-frequency F] [--json-key text]
// Special tokens default to DeepSeek-V3's <｜begin▁of▁sentence｜> (id 0) and <｜end▁of▁sentence｜> (id 1);
// the pre-tokenizer is DeepSeek-V3's (digits, CJK, main regex, ByteLevel). The output loads with Hugging
// Face `tokenizers` and with dsv3::Tokenizer. Deterministic for the same input and options.
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include <boost/program_options.hpp>

#include "core/error.h"
#include "data/tokenizer.h"

using namespace dsv3;
namespace po = boost::program_options;

int main(int argc, char** argv) {
  try {
    po::options_description opts("dsv3-train-tokenizer --input FILE.jsonl --vocab-size N --output tokenizer.json");
    opts.add_options()("help,h", "print this help")("input", po::value<std::string>(), "JSONL corpus, one {\"text\": ...} per line")(
        "vocab-size", po::value<int64_t>(), "vocabulary size including special and byte tokens")(
        "output", po::value<std::string>(), "tokenizer.json to write")(
        "special-tokens", po::value<std::string>()->default_value(std::string(kBosToken) + "," + kEosToken),
        "comma-separated special tokens, ids 0, 1, ...")(
        "min-frequency", po::value<int64_t>()->default_value(2), "pairs seen fewer times are not merged")(
        "json-key", po::value<std::string>()->default_value("text"), "the key of the document text");
    po::variables_map vm;
    po::store(po::parse_command_line(argc, argv, opts), vm);
    po::notify(vm);
    if (vm.count("help")) {
      std::cout << opts << "\n";
      return 0;
    }
    for (const char* k : {"input", "vocab-size", "output"}) DSV3_CHECK(vm.count(k), "--" << k << " is required (see --help)");
    const std::string input = vm["input"].as<std::string>(), key = vm["json-key"].as<std::string>();
    BpeTrainerOptions o;
    o.vocab_size = vm["vocab-size"].as<int64_t>();
    o.min_frequency = vm["min-frequency"].as<int64_t>();
    o.special_tokens.clear();
    {
      std::stringstream ss(vm["special-tokens"].as<std::string>());
      for (std::string t; std::getline(ss, t, ',');)
        if (!t.empty()) o.special_tokens.push_back(t);
    }
    DSV3_CHECK(o.vocab_size >= (int64_t)o.special_tokens.size() + 256,
               "--vocab-size " << o.vocab_size << " must be >= " << o.special_tokens.size() + 256
                               << " (special tokens + 256 byte tokens)");

    std::ifstream in(input, std::ios::binary);
    DSV3_CHECK(in.good(), input << ": cannot open");
    std::vector<std::string> texts;
    int64_t n_line = 0;
    for (std::string line; std::getline(in, line);) {
      ++n_line;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(line);
      } catch (const nlohmann::json::exception& e) {
        DSV3_FAIL(input << ":" << n_line << ": not valid JSON (" << e.what() << ")");
      }
      DSV3_CHECK(j.is_object() && j.contains(key) && j[key].is_string(),
                 input << ":" << n_line << ": expected a JSON object with a string \"" << key << "\"");
      texts.push_back(j[key].get<std::string>());
    }
    const auto t0 = std::chrono::steady_clock::now();
    const std::string out = train_bpe(texts, o);
    const std::string path = vm["output"].as<std::string>();
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    DSV3_CHECK(f.good(), path << ": cannot open for writing");
    f << out;
    f.close();
    DSV3_CHECK(!f.fail(), path << ": write failed");
    const Tokenizer tok = Tokenizer::from_json_text(out, path);  // check that it loads
    std::printf("dsv3-train-tokenizer: %zu documents from %s -> %s: vocab %lld, %.2f s\n", texts.size(), input.c_str(),
                path.c_str(), (long long)tok.vocab_size(),
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dsv3-train-tokenizer: error: %s\n", e.what());
    return 2;
  }
}
