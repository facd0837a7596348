// libFuzzer target: dsv3's checks of what a structurally valid HDF5 checkpoint contains (src/io/checkpoint.cpp, and
// checkpoint_model_config in src/io/convert.cpp: the config rebuilt from the hf_config / deck attributes).
// HDF5's own binary parser is not fuzzed (libhdf5 is not ours and not instrumented): every mutation goes through the
// HDF5 C API, so the files stay well-formed HDF5 and the fuzzer explores our metadata checks instead.
//
// Once per process: a tiny model (kConfig: 1 MoE layer, 4 routed experts, no shared expert, no q-LoRA, no MTP: 15
// parameters, as few datasets as the table allows: HDF5 spends its time per dataset opened) with deterministic
// parameters and AdamW state is saved by our own writers into two templates:
//   template 0: save_checkpoint(params, AdamW): /model + /optim/{master,exp_avg,exp_avg_sq}, iteration 7
//   template 1: CheckpointFileWriter (the converters' writer): /model only, iteration 0, an hf_config attribute
// Per input: byte 0 = options (bit 0: the template; bit 1: the loading AdamW keeps BF16 moments; bit 2: also read
// through the directory's `latest`; bit 3: also load without an optimizer and weights_only; bit 4: find/resume on the
// directory, auto and explicit, even when no operation changed the directory; the optional calls save time), then up
// to 32 HDF5 edits and 16 file edits, each an opcode byte (mod 15) and its operands (a missing byte reads as 0):
//   HDF5 edits (the copy is open read-write):
//     0 int attr    obj name type space value64       set attribute `name` of `obj` (replaced): an integer/float
//                                                     type (LE/BE, 8..64 bits), scalar/null/1-D/2-D space
//     1 str attr    obj name kind space source ...    a string attribute: fixed NULLTERM/NULLPAD/SPACEPAD, longer
//                                                     than its text, or variable-length; the text from the input,
//                                                     or the existing text spliced / cut (JSON and deck stay close
//                                                     to valid)
//     2 del attr    obj name
//     3 ren attr    obj name name
//     4 redataset   ds dtype rank dims... layout fill sum   replace a dataset by another dtype/rank/shape (near the
//                                                     original, small, or huge with no storage), layout, data, checksum
//     5 del link    obj                               delete a dataset or group (/model, /optim/master, ...)
//     6 move        obj dest                          rename a dataset/group onto another name (replacing it)
//     7 link        obj kind dest                     hard / soft / dangling soft / external link at `dest`
//     8 add         where kind name                   add an unexpected group, dataset, string dataset, named type
//     9 write       ds first count value32            overwrite elements (checksum no longer matches)
//    10 fix sum     ds                                recompute and store the dataset's checksum attribute
//   file edits (applied after the file is closed):
//    11 truncate    frac16                            cut the file
//    12 flip        ds offset32 xor                   flip a byte in a dataset's raw data region only
//    13 latest      kind name                         rewrite/delete DIR/latest (names, CR, "..", a directory)
//    14 dir entry   kind digits                       add iter_<digits>.h5 (a copy, empty, a directory, a .tmp,
//                                                     a symlink; the digits may overflow int64)
// obj/ds/dest pick from the template's objects (root, groups, datasets); name picks a known attribute name or reads a
// length-prefixed string. Then the loader entry points run: read_checkpoint_info, verify_checkpoint,
// CheckpointFileReader (on the file, and with bit 2 on the directory: info, attr, datasets, and shape /
// stored_checksum / read of the datasets the edits touched or added), checkpoint_model_config, load_checkpoint
// (full; with bit 3 also without an optimizer and weights_only) into the template's model, and find_checkpoint /
// resume_checkpoint on the directory (auto and explicit; when the directory or `latest` was edited, or bit 4).
// Properties: every call succeeds with sane results or throws a dsv3::Error with a non-empty (one-line) message;
// verify_checkpoint's message names the file; a loaded/read state has iteration, consumed_samples, adam_t >= 0 and a
// finite consumed_tokens >= 0; an unmodified template loads bit-identically; find_checkpoint returns a file that
// verifies; no HDF5 identifier (file object, dataspace, datatype, property list) stays open afterwards.
#include <hdf5.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "core/deck.h"
#include "core/log.h"
#include "fuzz_common.h"
#include "io/checkpoint.h"
#include "io/convert.h"
#include "model/config.h"
#include "model/params.h"
#include "optim/adamw.h"

using namespace dsv3;
using dsv3_fuzz::die;
using dsv3_fuzz::expect_ok_or_error;
namespace fs = std::filesystem;

namespace {

const char* const kConfig = R"({
  "vocab_size": 32, "hidden_size": 16, "intermediate_size": 16, "moe_intermediate_size": 8,
  "num_hidden_layers": 1, "first_k_dense_replace": 0, "moe_layer_freq": 1,
  "num_attention_heads": 2, "num_key_value_heads": 2, "q_lora_rank": null, "kv_lora_rank": 8,
  "qk_nope_head_dim": 4, "qk_rope_head_dim": 4, "v_head_dim": 4,
  "n_routed_experts": 4, "n_shared_experts": 0, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
  "routed_scaling_factor": 2.5, "norm_topk_prob": true, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
  "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "max_position_embeddings": 32, "num_nextn_predict_layers": 0,
  "tie_word_embeddings": false, "rope_interleave": true, "bos_token_id": 0, "eos_token_id": 1,
  "rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16, "beta_fast": 32,
                   "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
  "quantization_config": {"weight_block_size": [8, 8]}
})";

// The model section of a deck (stored, resolved, as the deck attribute).
const char* const kDeck =
    "[model]\nvocab_size = 32\nhidden_size = 16\nintermediate_size = 16\nmoe_intermediate_size = 8\n"
    "num_hidden_layers = 1\nfirst_k_dense_replace = 0\nnum_attention_heads = 2\nnum_key_value_heads = 2\n"
    "q_lora_rank = 0\nkv_lora_rank = 8\nqk_nope_head_dim = 4\nqk_rope_head_dim = 4\nv_head_dim = 4\n"
    "n_routed_experts = 4\nn_shared_experts = 0\nnum_experts_per_tok = 2\nn_group = 2\ntopk_group = 1\n"
    "max_position_embeddings = 32\nnum_nextn_predict_layers = 0\n";

const char* const kAttrNames[] = {"format_version", "dsv3_version", "iteration", "consumed_samples",
                                  "consumed_tokens", "adam_t", "rng_seed", "rng_state", "deck", "layout",
                                  "moment_dtype", "checksum_algorithm", "hf_config", "checksum"};
constexpr int kNumAttrNames = sizeof(kAttrNames) / sizeof(kAttrNames[0]);

struct Template {
  std::string file_name;             // iter_0000007.h5
  std::string bytes;                 // the whole file
  std::vector<std::string> objects;  // "/", the groups, then the datasets (sorted)
  size_t first_dataset = 0;          // objects[first_dataset..] are datasets
};

// Identifiers of the kinds our code opens and must close (open objects of a file, dataspaces, types, property lists).
int64_t open_ids() {
  int64_t n = 0;
  for (H5I_type_t t : {H5I_FILE, H5I_GROUP, H5I_DATATYPE, H5I_DATASPACE, H5I_DATASET, H5I_ATTR, H5I_GENPROP_LST}) {
    hsize_t k = 0;
    if (H5Inmembers(t, &k) >= 0) n += (int64_t)k;
  }
  return n;
}

struct World {
  ModelConfig cfg;
  Params params;                   // the template's values
  Params load_params;              // loaded into
  std::unique_ptr<AdamW> opt;      // the template's optimizer (FP32 moments)
  std::unique_ptr<AdamW> load_opt, load_opt16;
  Template tpl[2];
  fs::path dir;                    // per input: the checkpoint directory
  int64_t ids = 0;                 // open_ids() between inputs
};

// ---- input reader: bytes in order, 0 when exhausted --------------------------------------------------------------
struct In {
  const uint8_t* p;
  size_t n, i = 0;
  bool done() const { return i >= n; }
  uint8_t u8() { return i < n ? p[i++] : 0; }
  uint16_t u16() { return uint16_t(u8() | (uint16_t(u8()) << 8)); }
  uint32_t u32() { return uint32_t(u16()) | (uint32_t(u16()) << 16); }
  uint64_t u64() { return uint64_t(u32()) | (uint64_t(u32()) << 32); }
  std::string str(size_t max) {  // one length byte (0xFF: two), then the bytes
    size_t len = u8();
    if (len == 0xFF) len = u16();
    len = std::min({len, max, n - std::min(i, n)});
    std::string s(reinterpret_cast<const char*>(p + std::min(i, n)), len);
    i += len;
    return s;
  }
};

// An identifier the harness opened (closed on scope exit; the harness ignores HDF5 failures while mutating).
struct Id {
  hid_t id;
  herr_t (*close)(hid_t);
  Id(hid_t i, herr_t (*c)(hid_t)) : id(i), close(c) {}
  ~Id() {
    if (id >= 0) close(id);
  }
  Id(const Id&) = delete;
  Id& operator=(const Id&) = delete;
  operator hid_t() const { return id; }
  bool ok() const { return id >= 0; }
};

herr_t collect(hid_t, const char* name, const H5O_info_t* info, void* data) {
  auto* v = static_cast<std::vector<std::pair<int, std::string>>*>(data);
  const std::string n = std::string(name) == "." ? "/" : "/" + std::string(name);
  v->emplace_back(info->type == H5O_TYPE_DATASET ? 1 : 0, n);
  return 0;
}

std::string read_bytes(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

void fill(float* x, int64_t n, uint32_t seed) {
  for (int64_t i = 0; i < n; ++i) x[i] = float(int32_t((uint32_t(i) * 2654435761u + seed) >> 8) % 2001 - 1000) / 997.f;
}

Template make_template(const fs::path& file) {
  Template t;
  t.file_name = file.filename().string();
  t.bytes = read_bytes(file);
  const hid_t f = H5Fopen(file.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  if (f < 0) die("cannot open the template " + file.string());
  std::vector<std::pair<int, std::string>> objs;
  H5Ovisit(f, H5_INDEX_NAME, H5_ITER_INC, collect, &objs);
  H5Fclose(f);
  std::sort(objs.begin(), objs.end());
  for (auto& [kind, name] : objs) t.objects.push_back(name);
  t.first_dataset = size_t(std::find_if(objs.begin(), objs.end(), [](auto& o) { return o.first == 1; }) - objs.begin());
  if (t.first_dataset == 0 || t.first_dataset >= t.objects.size()) die("template without groups or datasets");
  return t;
}

World& world() {
  static World* w = [] {
    auto* w = new World;
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
    log::init(0, log::Level::error);  // the loaders' fallback warnings are expected here
    w->cfg = model_config_from_json(nlohmann::json::parse(kConfig), "fuzz_checkpoint config");
    w->cfg.validate();
    w->params = Params(build_param_table(w->cfg));
    fill(w->params.data(), w->params.size(), 1);
    w->opt = std::make_unique<AdamW>(w->params, AdamWConfig{});
    uint32_t seed = 2;
    for (AdamW::Bucket& b : w->opt->buckets()) {
      fill(b.m.data(), (int64_t)b.m.size(), seed++);
      fill(b.v.data(), (int64_t)b.v.size(), seed++);
      for (float& v : b.v) v = std::fabs(v);
    }
    w->opt->set_t(7);
    w->load_params = Params(w->params.table());
    w->load_opt = std::make_unique<AdamW>(w->load_params, AdamWConfig{});
    AdamWConfig c16;
    c16.bf16_moments = true;
    w->load_opt16 = std::make_unique<AdamW>(w->load_params, c16);

    const fs::path root = dsv3_fuzz::scratch_dir();
    const std::string deck = Deck::parse_text(kDeck, "fuzz.deck").resolved_text();
    const TrainState st{7, 28, 28.0 * 16, 11};
    const SaveResult r0 = save_checkpoint((root / "tpl0").string(), nullptr, w->params, w->opt.get(), st, deck, "dp1");
    w->tpl[0] = make_template(r0.path);
    std::vector<CheckpointDataset> ds;
    for (const ParamSpec& p : w->params.table()) ds.push_back({"/model/" + p.name, p.shape});
    CheckpointFileWriter wr((root / "tpl1").string(), nullptr, ds, TrainState{0, 0, 0, -1}, deck, "converted",
                            {{"hf_config", nlohmann::json::parse(kConfig).dump()}});
    for (size_t i = 0; i < ds.size(); ++i) {
      const ParamSpec& p = w->params.table()[i];
      wr.write(i, 0, p.numel(), w->params.get(p.name));
    }
    w->tpl[1] = make_template(wr.finish().path);
    w->dir = root / "run";
    w->ids = open_ids();
    return w;
  }();
  return *w;
}

// ---- HDF5 mutations -------------------------------------------------------------------------------------------------
struct Mutator {
  World& w;
  const Template& t;
  hid_t file;
  In& in;
  std::set<std::string>& touched;  // every object an operation named (the reader looks at these datasets)

  const std::string& obj(uint8_t b) {
    const std::string& o = t.objects[b % t.objects.size()];
    touched.insert(o);
    return o;
  }
  const std::string& dataset(uint8_t b) {
    const std::string& o = t.objects[t.first_dataset + b % (t.objects.size() - t.first_dataset)];
    touched.insert(o);
    return o;
  }
  std::string attr_name() {
    const uint8_t b = in.u8();
    if (b % 16 < kNumAttrNames) return kAttrNames[b % 16];
    std::string s = in.str(64);
    return s.empty() ? std::string("x") : s;
  }
  // a new object name: a known one (replacing it) or a fuzzed name under a group
  std::string dest_name() {
    const uint8_t b = in.u8();
    if (b < 0xC0) return obj(b);
    std::string s = in.str(64);
    s.erase(std::remove(s.begin(), s.end(), '\0'), s.end());
    const char* parents[] = {"/", "/model/", "/optim/master/", "/optim/"};
    std::string n = std::string(parents[b & 3]) + (s.empty() ? "x" : s);
    while (n.size() > 1 && n.back() == '/') n.pop_back();
    touched.insert(n);
    return n;
  }

  static hid_t num_type(uint8_t c) {
    const hid_t types[] = {H5T_STD_I8LE,  H5T_STD_I16LE, H5T_STD_I32LE,   H5T_STD_I64LE,   H5T_STD_I64BE,  H5T_STD_U8LE,
                           H5T_STD_U32LE, H5T_STD_U64LE, H5T_IEEE_F32LE, H5T_IEEE_F64LE, H5T_IEEE_F64BE, H5T_STD_U64BE};
    return types[c % 12];
  }
  // scalar, null, 1-D of 0..4, 2-D 2x2
  static hid_t space(uint8_t c, hsize_t* count) {
    switch (c % 4) {
      case 0: *count = 1; return H5Screate(H5S_SCALAR);
      case 1: *count = 0; return H5Screate(H5S_NULL);
      case 2: {
        hsize_t d = (c >> 2) % 5;
        *count = d;
        return H5Screate_simple(1, &d, nullptr);
      }
      default: {
        hsize_t d[2] = {2, 2};
        *count = 4;
        return H5Screate_simple(2, d, nullptr);
      }
    }
  }

  void int_attr() {
    const std::string& o = obj(in.u8());
    const std::string name = attr_name();
    const hid_t type = num_type(in.u8());
    hsize_t count = 0;
    Id sp(space(in.u8(), &count), H5Sclose);
    const uint64_t raw = in.u64();
    if (H5Aexists_by_name(file, o.c_str(), name.c_str(), H5P_DEFAULT) > 0)
      H5Adelete_by_name(file, o.c_str(), name.c_str(), H5P_DEFAULT);
    Id a(H5Acreate_by_name(file, o.c_str(), name.c_str(), type, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
    if (!a.ok() || count == 0) return;
    if (H5Tget_class(type) == H5T_FLOAT) {
      double v;
      // small codes give ordinary values (-3.5, 7, 1e30, ...), others the raw bits (NaN, Inf, denormals)
      if ((raw >> 56) == 0) v = double(int64_t(raw & 0xFFFF) - 0x8000) * std::pow(10.0, double((raw >> 16) & 0x3F) - 8);
      else std::memcpy(&v, &raw, 8);
      std::vector<double> vals(count, v);
      H5Awrite(a, H5T_NATIVE_DOUBLE, vals.data());
    } else {  // converted (clipped) to the attribute's type
      std::vector<uint64_t> vals(count, raw);
      H5Awrite(a, H5Tget_sign(type) == H5T_SGN_NONE ? H5T_NATIVE_UINT64 : H5T_NATIVE_INT64, vals.data());
    }
  }

  std::string existing_string(const std::string& o, const std::string& name) {
    if (H5Aexists_by_name(file, o.c_str(), name.c_str(), H5P_DEFAULT) <= 0) return "";
    Id a(H5Aopen_by_name(file, o.c_str(), name.c_str(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
    Id ty(H5Aget_type(a), H5Tclose);
    Id sp(H5Aget_space(a), H5Sclose);
    if (!a.ok() || !ty.ok() || H5Tget_class(ty) != H5T_STRING || H5Tis_variable_str(ty) != 0 ||
        H5Sget_simple_extent_npoints(sp) != 1)
      return "";
    std::string s(H5Tget_size(ty), '\0');
    if (H5Aread(a, ty, s.data()) < 0) return "";
    s.resize(std::strlen(s.c_str()));
    return s;
  }

  void str_attr() {
    const std::string& o = obj(in.u8());
    const std::string name = attr_name();
    const uint8_t kind = in.u8();
    hsize_t count = 0;
    Id sp(space(in.u8() & 0x0B /* scalar mostly: no 2-D */, &count), H5Sclose);
    std::string text;
    const uint8_t src = in.u8();
    if (src % 3 == 0) {
      text = in.str(4096);
    } else {
      text = existing_string(o, name);
      const size_t at = text.empty() ? 0 : in.u16() % (text.size() + 1);
      if (src % 3 == 1) {  // splice: delete up to 255 bytes at `at`, insert the input's string
        const size_t del = std::min<size_t>(in.u8(), text.size() - at);
        text = text.substr(0, at) + in.str(1024) + text.substr(at + del);
      } else {
        text.resize(at);
      }
    }
    if (H5Aexists_by_name(file, o.c_str(), name.c_str(), H5P_DEFAULT) > 0)
      H5Adelete_by_name(file, o.c_str(), name.c_str(), H5P_DEFAULT);
    Id ty(H5Tcopy(H5T_C_S1), H5Tclose);
    const bool vlen = kind % 5 == 4;
    size_t size = text.size() + 1;
    if (kind % 5 == 3) size += 1 + (kind >> 3);  // longer than its text: padding bytes
    if (vlen) H5Tset_size(ty, H5T_VARIABLE);
    else H5Tset_size(ty, std::max<size_t>(size, 1));
    H5Tset_strpad(ty, kind % 5 == 1 ? H5T_STR_NULLPAD : kind % 5 == 2 ? H5T_STR_SPACEPAD : H5T_STR_NULLTERM);
    if (kind & 0x80) H5Tset_cset(ty, H5T_CSET_UTF8);
    Id a(H5Acreate_by_name(file, o.c_str(), name.c_str(), ty, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
    if (!a.ok() || count == 0) return;
    if (vlen) {
      std::vector<const char*> ptrs(count, text.c_str());
      H5Awrite(a, ty, ptrs.data());
    } else {
      const size_t n = H5Tget_size(ty);
      std::string buf(n * count, '\0');
      for (hsize_t k = 0; k < count; ++k) std::memcpy(&buf[k * n], text.data(), std::min(n, text.size()));
      H5Awrite(a, ty, buf.data());
    }
  }

  void del_attr() {
    const std::string& o = obj(in.u8());
    const std::string name = attr_name();
    H5Adelete_by_name(file, o.c_str(), name.c_str(), H5P_DEFAULT);
  }
  void ren_attr() {
    const std::string& o = obj(in.u8());
    const std::string a = attr_name(), b = attr_name();
    if (H5Aexists_by_name(file, o.c_str(), b.c_str(), H5P_DEFAULT) > 0)
      H5Adelete_by_name(file, o.c_str(), b.c_str(), H5P_DEFAULT);
    H5Arename_by_name(file, o.c_str(), a.c_str(), b.c_str(), H5P_DEFAULT);
  }

  // the dataset's data as floats (empty when unreadable or larger than 1 Mi elements)
  std::vector<float> read_floats(hid_t d) {
    Id sp(H5Dget_space(d), H5Sclose);
    const hssize_t n = H5Sget_simple_extent_npoints(sp);
    if (!sp.ok() || n <= 0 || n > (1 << 20)) return {};
    std::vector<float> v(size_t(n), 0.f);
    if (H5Dread(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data()) < 0) return {};
    return v;
  }
  void set_checksum(hid_t d, uint64_t sum) {
    if (H5Aexists(d, "checksum") > 0) H5Adelete(d, "checksum");
    Id sp(H5Screate(H5S_SCALAR), H5Sclose);
    Id a(H5Acreate2(d, "checksum", H5T_STD_U64LE, sp, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
    if (a.ok()) H5Awrite(a, H5T_NATIVE_UINT64, &sum);
  }

  void redataset() {
    const std::string& name = dataset(in.u8());
    const uint8_t tcode = in.u8(), rcode = in.u8();
    std::vector<hsize_t> orig;
    std::vector<float> old;
    uint64_t old_sum = 0;
    bool had_sum = false;
    {
      Id d(H5Dopen2(file, name.c_str(), H5P_DEFAULT), H5Dclose);
      if (d.ok()) {
        Id sp(H5Dget_space(d), H5Sclose);
        const int nd = H5Sget_simple_extent_ndims(sp);
        if (nd > 0) {
          orig.resize(size_t(nd));
          H5Sget_simple_extent_dims(sp, orig.data(), nullptr);
        }
        old = read_floats(d);
        if (H5Aexists(d, "checksum") > 0) {
          Id a(H5Aopen(d, "checksum", H5P_DEFAULT), H5Aclose);
          had_sum = H5Aread(a, H5T_NATIVE_UINT64, &old_sum) >= 0;
        }
      }
    }
    // the new type
    hid_t type = H5T_IEEE_F32LE;
    Id owned(-1, H5Tclose);
    switch (tcode % 8) {
      case 0: type = H5T_IEEE_F32LE; break;
      case 1: type = H5T_IEEE_F32BE; break;
      case 2: type = H5T_IEEE_F64LE; break;
      case 3: type = H5T_STD_I32LE; break;
      case 4: type = H5T_STD_U8LE; break;
      case 5: owned.id = H5Tcopy(H5T_C_S1), H5Tset_size(owned, 4), type = owned; break;
      case 6: owned.id = H5Tcreate(H5T_COMPOUND, 4), H5Tinsert(owned, "x", 0, H5T_NATIVE_FLOAT), type = owned; break;
      default: owned.id = H5Tarray_create2(H5T_NATIVE_FLOAT, 1, std::array<hsize_t, 1>{1}.data()), type = owned; break;
    }
    // the new space: rank 0 = scalar, 1..4 simple, 5 = null
    const int rank = rcode % 6;
    std::vector<hsize_t> dims;
    bool huge = false;
    for (int k = 0; k < rank && rank <= 4; ++k) {
      const uint8_t c = in.u8();
      hsize_t v;
      if (c < 0x80) {
        const int64_t base = k < (int)orig.size() ? (int64_t)orig[size_t(k)] : 1;
        v = (hsize_t)std::max<int64_t>(0, base + (c % 7) - 3);
      } else if (c < 0xF0) {
        v = c - 0x80;
      } else {
        v = c == 0xFF ? hsize_t(1) << 63 : hsize_t(1) << (16 + (c & 15) * 3);  // 2^16 .. 2^58, 2^63
        huge = true;
      }
      dims.push_back(v);
    }
    const uint8_t lcode = in.u8(), fcode = in.u8(), scode = in.u8();
    Id sp(rank == 0 ? H5Screate(H5S_SCALAR) : rank == 5 ? H5Screate(H5S_NULL)
                                                        : H5Screate_simple(rank, dims.data(), nullptr),
          H5Sclose);
    if (!sp.ok()) return;
    const hssize_t npoints = H5Sget_simple_extent_npoints(sp);
    const size_t esize = H5Tget_size(type);
    const bool small = !huge && npoints >= 0 && double(npoints) * double(esize) <= double(1 << 20);
    Id dcpl(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
    H5Pset_fill_time(dcpl, H5D_FILL_TIME_NEVER);
    switch (small ? lcode % 4 : 1) {
      case 0: H5Pset_layout(dcpl, H5D_CONTIGUOUS), H5Pset_alloc_time(dcpl, H5D_ALLOC_TIME_EARLY); break;
      case 1: H5Pset_layout(dcpl, H5D_CONTIGUOUS), H5Pset_alloc_time(dcpl, H5D_ALLOC_TIME_LATE); break;
      case 2:
        if (rank >= 1 && rank <= 4) {
          std::vector<hsize_t> ch(dims.size());
          for (size_t k = 0; k < dims.size(); ++k) ch[k] = std::max<hsize_t>(1, std::min<hsize_t>(dims[k], 4));
          H5Pset_chunk(dcpl, rank, ch.data());
          if (lcode & 4) H5Pset_deflate(dcpl, 1);
        }
        break;
      default:
        if (npoints * hssize_t(esize) < 32768) H5Pset_layout(dcpl, H5D_COMPACT);
        break;
    }
    H5Ldelete(file, name.c_str(), H5P_DEFAULT);
    Id d(H5Dcreate2(file, name.c_str(), type, sp, H5P_DEFAULT, dcpl, H5P_DEFAULT), H5Dclose);
    if (!d.ok()) return;
    std::vector<float> data;
    if (small && npoints > 0 && fcode % 3 != 2) {
      data.assign(size_t(npoints), 0.f);
      if (fcode % 3 == 0) std::copy_n(old.begin(), std::min(old.size(), data.size()), data.begin());
      if (type == owned.id && tcode % 8 == 5) {  // a string type: write bytes
        std::string bytes(size_t(npoints) * esize, 'a');
        H5Dwrite(d, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, bytes.data());
      } else {
        H5Dwrite(d, tcode % 8 >= 6 ? type : H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, data.data());
      }
    }
    switch (scode % 3) {
      case 0: if (had_sum) set_checksum(d, old_sum); break;
      case 1: set_checksum(d, checkpoint_checksum(data.data(), (int64_t)data.size(), 0)); break;
      default: break;  // no checksum attribute
    }
  }

  void del_link() { H5Ldelete(file, obj(in.u8()).c_str(), H5P_DEFAULT); }
  void move() {
    const std::string& from = obj(in.u8());
    const std::string to = dest_name();
    if (from == "/" || from == to) return;
    if (H5Lexists(file, to.c_str(), H5P_DEFAULT) > 0) H5Ldelete(file, to.c_str(), H5P_DEFAULT);
    H5Lmove(file, from.c_str(), file, to.c_str(), H5P_DEFAULT, H5P_DEFAULT);
  }
  void link() {
    const std::string& target = obj(in.u8());
    const uint8_t kind = in.u8();
    const std::string to = dest_name();
    if (to == "/") return;
    if (H5Lexists(file, to.c_str(), H5P_DEFAULT) > 0) H5Ldelete(file, to.c_str(), H5P_DEFAULT);
    switch (kind % 5) {
      case 0: H5Lcreate_hard(file, target.c_str(), file, to.c_str(), H5P_DEFAULT, H5P_DEFAULT); break;
      case 1: H5Lcreate_soft(target.c_str(), file, to.c_str(), H5P_DEFAULT, H5P_DEFAULT); break;
      case 2: H5Lcreate_soft("/no/such/object", file, to.c_str(), H5P_DEFAULT, H5P_DEFAULT); break;
      case 3: H5Lcreate_external("no_such_file.h5", target.c_str(), file, to.c_str(), H5P_DEFAULT, H5P_DEFAULT); break;
      default: H5Lcreate_soft(to.c_str(), file, to.c_str(), H5P_DEFAULT, H5P_DEFAULT); break;  // a loop
    }
  }
  void add() {
    const std::string to = dest_name();
    const uint8_t kind = in.u8();
    if (to == "/" || H5Lexists(file, to.c_str(), H5P_DEFAULT) > 0) return;
    switch (kind % 4) {
      case 0: {
        Id g(H5Gcreate2(file, to.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose);
        break;
      }
      case 1: {
        hsize_t n = kind >> 2;
        Id sp(H5Screate_simple(1, &n, nullptr), H5Sclose);
        Id d(H5Dcreate2(file, to.c_str(), H5T_IEEE_F32LE, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Dclose);
        break;
      }
      case 2: {
        Id ty(H5Tcopy(H5T_C_S1), H5Tclose);
        H5Tset_size(ty, H5T_VARIABLE);
        Id sp(H5Screate(H5S_SCALAR), H5Sclose);
        Id d(H5Dcreate2(file, to.c_str(), ty, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Dclose);
        const char* s = "text";
        if (d.ok()) H5Dwrite(d, ty, H5S_ALL, H5S_ALL, H5P_DEFAULT, &s);
        break;
      }
      default: {
        Id ty(H5Tcopy(H5T_IEEE_F32LE), H5Tclose);
        H5Tcommit2(file, to.c_str(), ty, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        break;
      }
    }
  }
  void write() {
    Id d(H5Dopen2(file, dataset(in.u8()).c_str(), H5P_DEFAULT), H5Dclose);
    const hsize_t first = in.u16(), count = std::max<hsize_t>(1, in.u8());
    const uint32_t bits = in.u32();
    if (!d.ok()) return;
    Id fs(H5Dget_space(d), H5Sclose);
    const hssize_t n = H5Sget_simple_extent_npoints(fs);
    if (n <= 0 || H5Sget_simple_extent_ndims(fs) < 1) return;
    std::vector<float> all = read_floats(d);
    if (all.empty()) return;
    float v;
    std::memcpy(&v, &bits, 4);
    for (hsize_t k = first % all.size(), e = std::min<hsize_t>(all.size(), k + count); k < e; ++k) all[k] = v;
    H5Dwrite(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, all.data());
  }
  void fix_sum() {
    Id d(H5Dopen2(file, dataset(in.u8()).c_str(), H5P_DEFAULT), H5Dclose);
    if (!d.ok()) return;
    const std::vector<float> all = read_floats(d);
    set_checksum(d, checkpoint_checksum(all.data(), (int64_t)all.size(), 0));
  }
};

// ---- file-level mutations (after the file is closed) ------------------------------------------------------------
struct RawRegion {
  haddr_t offset;
  hsize_t size;
};

std::vector<RawRegion> raw_regions(hid_t file, const Template& t) {
  std::vector<RawRegion> out;
  for (size_t i = t.first_dataset; i < t.objects.size(); ++i) {
    RawRegion r{HADDR_UNDEF, 0};
    if (H5Lexists(file, t.objects[i].c_str(), H5P_DEFAULT) > 0) {
      Id d(H5Dopen2(file, t.objects[i].c_str(), H5P_DEFAULT), H5Dclose);
      if (d.ok()) {
        Id dcpl(H5Dget_create_plist(d), H5Pclose);
        if (dcpl.ok() && H5Pget_layout(dcpl) == H5D_CONTIGUOUS) {
          r.offset = H5Dget_offset(d);
          r.size = H5Dget_storage_size(d);
        }
      }
    }
    out.push_back(r);
  }
  return out;
}

void file_edit(uint8_t op, In& in, const fs::path& dir, const fs::path& file, const Template& t,
               const std::vector<RawRegion>& regions) {
  std::error_code ec;
  switch (op) {
    case 11: {
      const uint64_t size = fs::file_size(file, ec);
      if (!ec) fs::resize_file(file, size * in.u16() / 65536, ec);
      break;
    }
    case 12: {
      const RawRegion& r = regions[in.u8() % regions.size()];
      const uint32_t off = in.u32();
      const uint8_t x = in.u8() | 1;
      if (r.offset == HADDR_UNDEF || r.size == 0) break;
      std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
      const std::streamoff at = std::streamoff(r.offset + off % r.size);
      f.seekg(at);
      char c = 0;
      if (!f.get(c)) break;
      f.seekp(at);
      f.put(char(c ^ x));
      break;
    }
    case 13: {
      const uint8_t kind = in.u8();
      std::string s = in.str(128);
      const fs::path latest = dir / "latest";
      switch (kind % 8) {
        case 0: fs::remove(latest, ec); break;
        case 1: dsv3_fuzz::write_file(latest, ""); break;
        case 2: dsv3_fuzz::write_file(latest, t.file_name + "\r  \n"); break;
        case 3: dsv3_fuzz::write_file(latest, s); break;
        case 4: dsv3_fuzz::write_file(latest, "../run/" + t.file_name + "\n"); break;
        case 5: dsv3_fuzz::write_file(latest, "iter_0000099.h5\n"); break;
        case 6: dsv3_fuzz::write_file(latest, ".\n"); break;
        default: dsv3_fuzz::write_file(latest, "iter_0000001.h5\n" + t.file_name + "\n"); break;
      }
      break;
    }
    case 14: {
      const uint8_t kind = in.u8();
      std::string digits;
      for (char c : in.str(30)) digits += char('0' + (uint8_t(c) % 10));
      if (digits.empty()) digits = "0000001";
      const fs::path p = dir / ("iter_" + digits + ".h5");
      if (fs::exists(p, ec)) break;
      switch (kind % 6) {
        case 0: fs::copy_file(file, p, ec); break;        // the mutated file again
        case 1: dsv3_fuzz::write_file(p, t.bytes); break;  // the good template
        case 2: dsv3_fuzz::write_file(p, ""); break;
        case 3: fs::create_directory(p, ec); break;
        case 4: dsv3_fuzz::write_file(p.string() + ".tmp", t.bytes); break;
        default: fs::create_symlink(file.filename(), p, ec); break;
      }
      break;
    }
    default: break;
  }
}

// expect_ok_or_error, printing each dsv3::Error when FUZZ_CHECKPOINT_VERBOSE is set (to see what a seed reaches)
template <class F>
bool ok_or_error(const char* what, F&& f) {
  static const bool verbose = std::getenv("FUZZ_CHECKPOINT_VERBOSE") != nullptr;
  return expect_ok_or_error([&] {
    try {
      f();
      if (verbose) std::fprintf(stderr, "  %-22s ok\n", what);
    } catch (const Error& e) {
      if (verbose) std::fprintf(stderr, "  %-22s %s\n", what, e.what());
      throw;
    }
  });
}

// ---- properties -----------------------------------------------------------------------------------------------------
void check_state(const TrainState& s, const std::string& who) {
  if (s.iteration < 0 || s.consumed_samples < 0 || !std::isfinite(s.consumed_tokens) || s.consumed_tokens < 0)
    die(who + " accepted an insane state: iteration " + std::to_string(s.iteration) + ", consumed_samples " +
        std::to_string(s.consumed_samples) + ", consumed_tokens " + std::to_string(s.consumed_tokens));
}

// The reader on a file or directory: the root attributes, the list of datasets, and shape/checksum/read of the
// datasets an operation touched, those the template does not have (added, moved, linked) and the first one (every
// dataset each time would make the target several times slower: HDF5 copies property lists per dataset opened).
void exercise_reader(const std::string& what, const ModelConfig& expect_cfg, bool expect_cfg_ok, const Template& t,
                     const std::set<std::string>& touched) {
  ok_or_error("CheckpointFileReader", [&] {
    CheckpointFileReader rd(what);
    const CheckpointInfo info = rd.info();
    check_state(info.state, "CheckpointFileReader::info");
    if (info.adam_t < 0) die("CheckpointFileReader::info accepted adam_t " + std::to_string(info.adam_t));
    (void)rd.attr("deck");
    (void)rd.attr("no such attribute");
    std::vector<std::string> names;
    ok_or_error("reader.datasets", [&] { names = rd.datasets(); });
    std::vector<float> buf;
    for (size_t k = 0; k < names.size() && k < 256; ++k) {
      const std::string& n = names[k];
      if (k > 0 && !touched.count(n) && std::find(t.objects.begin(), t.objects.end(), n) != t.objects.end()) continue;
      ok_or_error("reader.shape/read", [&] {
        if (!rd.has(n)) die("CheckpointFileReader lists dataset " + n + " but has() denies it");
        const std::vector<int64_t> sh = rd.shape(n);
        __int128 numel = 1;
        for (int64_t d : sh) {
          if (d < 0) die("CheckpointFileReader::shape gave a negative extent for " + n);
          numel *= d;
          if (numel > (__int128(1) << 62)) numel = __int128(1) << 62;
        }
        (void)rd.stored_checksum(n);
        const int64_t head = (int64_t)std::min<__int128>(numel, 4096);
        buf.assign(size_t(std::max<int64_t>(head, 1)), 0.f);
        rd.read(n, 0, head, buf.data());
        if (numel > 4) rd.read(n, int64_t(numel - 4), 4, buf.data());
        expect_ok_or_error([&] {  // past the end: must be refused
          rd.read(n, int64_t(numel), 1, buf.data());
          die("CheckpointFileReader::read past the end of " + n + " succeeded");
        });
      });
    }
    ok_or_error("checkpoint_model_config", [&] {
      const ModelConfig c = checkpoint_model_config(rd);
      if (expect_cfg_ok && build_param_table(c).size() != build_param_table(expect_cfg).size())
        die("checkpoint_model_config of an unmodified template gave another model");
    });
  });
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  World& w = world();
  In in{data, size};
  const uint8_t opts = in.u8();
  const Template& t = w.tpl[opts & 1];
  AdamW& opt = (opts & 2) ? *w.load_opt16 : *w.load_opt;

  std::error_code ec;
  fs::remove_all(w.dir, ec);
  fs::create_directories(w.dir);
  const fs::path file = w.dir / t.file_name;
  dsv3_fuzz::write_file(file, t.bytes);
  dsv3_fuzz::write_file(w.dir / "latest", t.file_name + "\n");

  // HDF5 edits until the first file edit; the file edits follow once the file is closed
  bool modified = false, dir_edited = false;
  std::set<std::string> touched;
  std::vector<RawRegion> regions;
  {
    Id fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose);
    H5Pset_libver_bounds(fapl, H5F_LIBVER_V18, H5F_LIBVER_LATEST);
    Id f(H5Fopen(file.c_str(), H5F_ACC_RDWR, fapl), H5Fclose);
    if (!f.ok()) die("cannot open the template copy " + file.string());
    Mutator m{w, t, f, in, touched};
    for (int ops = 0; !in.done() && ops < 32; ++ops) {
      const size_t at = in.i;
      const uint8_t op = in.u8() % 15;
      if (op >= 11) {
        in.i = at;
        break;
      }
      modified = true;
      switch (op) {
        case 0: m.int_attr(); break;
        case 1: m.str_attr(); break;
        case 2: m.del_attr(); break;
        case 3: m.ren_attr(); break;
        case 4: m.redataset(); break;
        case 5: m.del_link(); break;
        case 6: m.move(); break;
        case 7: m.link(); break;
        case 8: m.add(); break;
        case 9: m.write(); break;
        default: m.fix_sum(); break;
      }
    }
    regions = raw_regions(f, t);
  }
  H5Eclear2(H5E_DEFAULT);
  if (H5Fget_obj_count(H5F_OBJ_ALL, H5F_OBJ_ALL) != 0) die("the harness left an HDF5 identifier open");
  for (int ops = 0; !in.done() && ops < 16; ++ops) {
    const uint8_t op = in.u8() % 15;
    if (op < 11) continue;
    modified = true;
    dir_edited |= op >= 13;
    file_edit(op, in, w.dir, file, t, regions);
  }

  if (const char* keep = std::getenv("FUZZ_CHECKPOINT_KEEP")) {  // debugging: a copy of the mutated directory
    fs::remove_all(keep, ec);
    fs::copy(w.dir, keep, fs::copy_options::recursive | fs::copy_options::copy_symlinks, ec);
  }
  const std::string path = file.string(), dir = w.dir.string();
  ok_or_error("read_checkpoint_info", [&] {
    const CheckpointInfo info = read_checkpoint_info(path);
    check_state(info.state, "read_checkpoint_info");
    if (info.adam_t < 0) die("read_checkpoint_info accepted adam_t " + std::to_string(info.adam_t));
    if (info.format_version != 1)
      die("read_checkpoint_info accepted format_version " + std::to_string(info.format_version));
  });
  const std::string verr = verify_checkpoint(path);
  if (std::getenv("FUZZ_CHECKPOINT_VERBOSE"))
    std::fprintf(stderr, "  %-22s %s\n", "verify_checkpoint", verr.empty() ? "ok" : verr.c_str());
  if (!verr.empty()) {
    dsv3_fuzz::check_error_message(verr);
    if (verr.find(path) == std::string::npos) die("verify_checkpoint's message does not name the file: " + verr);
  }
  if (!modified && !verr.empty()) die("verify_checkpoint rejects an unmodified template: " + verr);

  exercise_reader(path, w.cfg, !modified, t, touched);
  if (opts & 4) exercise_reader(dir, w.cfg, false, t, touched);

  const bool full = (opts & 1) == 0;  // template 0 has the optimizer state
  const bool loaded = ok_or_error("load_checkpoint", [&] {
    check_state(load_checkpoint(path, nullptr, w.load_params, full ? &opt : nullptr), "load_checkpoint");
  });
  if (!modified) {
    if (!loaded) die("load_checkpoint rejects an unmodified template");
    if (std::memcmp(w.load_params.data(), w.params.data(), size_t(w.params.size()) * 4) != 0)
      die("an unmodified template did not load bit-identically");
    if (full && opt.t() != 7) die("adam_t of an unmodified template did not load");
  }
  if (opts & 8) {
    ok_or_error("load (no optimizer)", [&] {
      check_state(load_checkpoint(path, nullptr, w.load_params, nullptr), "load_checkpoint");
    });
    ok_or_error("load (weights_only)", [&] {
      check_state(load_checkpoint(path, nullptr, w.load_params, &opt, /*weights_only=*/true), "load_checkpoint");
    });
  }

  // the directory: candidates, `latest`, fallback (when the directory or latest changed, or bit 4 asks for it)
  for (bool auto_mode : {true, false}) {
    if (!dir_edited && !(opts & 16)) break;
    ok_or_error(auto_mode ? "find_checkpoint auto" : "find_checkpoint", [&] {
      const auto found = find_checkpoint(dir, auto_mode);
      if (found && !verify_checkpoint(*found).empty()) die("find_checkpoint returned a file that does not verify");
    });
    ok_or_error(auto_mode ? "resume_checkpoint auto" : "resume_checkpoint", [&] {
      const auto r = resume_checkpoint(dir, auto_mode, nullptr, w.load_params, full ? &opt : nullptr);
      if (r) check_state(r->state, "resume_checkpoint");
    });
  }
  H5Eclear2(H5E_DEFAULT);
  if (H5Fget_obj_count(H5F_OBJ_ALL, H5F_OBJ_ALL) != 0) die("an HDF5 identifier of a checkpoint file stays open");
  if (open_ids() != w.ids)
    die("HDF5 identifiers leaked: " + std::to_string(open_ids() - w.ids) + " more open than before the input");
  H5garbage_collect();  // HDF5's free lists back to malloc: fewer inputs rerun by libFuzzer's leak check
  return 0;
}
