// defines: dsv3::StageLayout, parse_pp_layout, format_layout, layout_spec
// Which parts of the model each pipeline stage holds, from parallel.pp_layout in Megatron-Core's syntax
// (--pipeline-model-parallel-layout), without virtual stages: one '|'-separated stage per pp rank.
//
// Syntax: E embedding, t one decoder layer, m one MTP layer, L the loss (final norm + head + cross-entropy),
// | between stages, X*N repeats the previous symbol or parenthesised group N (>= 1) times (X*a*b = X*(a*b)),
// ( ) group, whitespace and commas ignored. Examples (the Megatron-Bridge DeepSeek-V3 recipe, 61 layers):
//   pp=16: "Et*4|(t*4|)*14tmL"   -> stage 0: E + layers 0-3; stages 1-14: 4 layers each; stage 15: layer 60, m, L
//   pp=32: "Et|(tt|)*30mL"       -> stage 0: E + layer 0; stages 1-30: 2 layers each; stage 31: m, L
// Rules checked (each error quotes the spec and the 1-based character it is about):
//   exactly pp stages; E exactly once, on the first stage; L exactly once, on the last stage; m exactly
//   mtp_layers times and only on the last stage (the MTP module needs the main model's last hidden state
//   and shares the loss stage's head); t exactly num_layers times; inside a stage the order is E, t..., m..., L.
//   Empty stages are legal (as in Megatron, e.g. "E||t|tmL"): such a stage passes activations through.
// Decoder layers are numbered 0..num_layers-1 in the order the t's appear.
#pragma once
#include <string>
#include <vector>

namespace dsv3 {

struct StageLayout {
  bool embedding = false;   // the word embedding (input of the first stage)
  std::vector<int> layers;  // global decoder layer indices, ascending, e.g. {4, 5, 6, 7}
  bool mtp = false;         // all MTP layers (only on the last stage)
  bool loss = false;        // final norm, output head and loss (only on the last stage)
  bool operator==(const StageLayout&) const = default;
};

// One StageLayout per pipeline stage (size pp). An empty (or all-blank) spec gives the even split: every
// stage floor(num_layers/pp) layers, the first num_layers % pp stages one more, E on stage 0, m and L on the
// last stage; it needs pp <= num_layers. Throws dsv3::Error naming parallel.pp_layout; `where` ends every message
// (the deck's where_set: "(parallel.pp_layout at run.deck:7, parallel.pp on the command line)").
std::vector<StageLayout> parse_pp_layout(const std::string& spec, int pp, int num_layers, int mtp_layers,
                                         const std::string& where = "");

// For the log, one line: "pp0: E t0-3 | pp1: t4-7 | ... | pp15: t60 m L" (an empty stage reads "pp1: -").
std::string format_layout(const std::vector<StageLayout>& layout);
// The canonical Megatron spec of a layout, "Et*4|t*4|...|tmL", with m repeated mtp_layers times;
// parse_pp_layout(layout_spec(l, k), ...) gives l back.
std::string layout_spec(const std::vector<StageLayout>& layout, int mtp_layers);

}  // namespace dsv3
