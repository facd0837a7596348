// libFuzzer target: config.json loading (src/model/config.cpp: model_config_from_file / model_config_from_json /
// ModelConfig::validate) and what a valid config feeds (src/model/params.cpp: build_param_table, count_params).
// The input is the config.json text. Properties: a config that validates has a parameter table whose sizes and
// counts fit int64 (no overflow, no huge allocation), and model_config_to_json round-trips it.
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "fuzz_common.h"
#include "model/config.h"
#include "model/params.h"

using namespace dsv3;
using dsv3_fuzz::die;
using dsv3_fuzz::expect_ok_or_error;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto path = dsv3_fuzz::scratch_dir() / "config.json";
  dsv3_fuzz::write_file(path, dsv3_fuzz::as_view(data, size));
  expect_ok_or_error([&] {
    const ModelConfig c = model_config_from_file(path.string());
    c.validate();
    const nlohmann::json j = model_config_to_json(c);
    ModelConfig back;
    try {
      back = model_config_from_json(nlohmann::json::parse(j.dump()), "round trip");
      back.validate();
    } catch (const Error& e) {
      die(std::string("model_config_to_json output does not load back: ") + e.what() + "\n" + j.dump());
    }
    if (model_config_to_json(back) != j) die("model_config_to_json round trip differs:\n" + j.dump() + "\n" +
                                             model_config_to_json(back).dump());
    if (c.num_hidden_layers > 64) return;  // valid, but slow to tabulate at fuzzing speed
    const std::vector<ParamSpec> table = build_param_table(c);
    for (const ParamSpec& p : table)
      for (int64_t d : p.shape)
        if (d < 0) die("negative dimension in " + p.name);
    (void)count_params(c);
  });
  return 0;
}
