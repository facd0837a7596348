// defines: dsv3::deck_keys() -- THE table of every deck key (name, type, default, bounds, help).
// Add new keys here and nowhere else; `dsv3 --help` prints this table. A key without a default and
// not required is optional: Deck::get() throws unless it was given, check Deck::given() first.
#include "core/deck.h"

// Entries name only the fields they set (designated initializers); the rest keep KeySpec's defaults.
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"

namespace dsv3 {

namespace {
using T = KeySpec::Type;
constexpr const char* kNone = nullptr;
}  // namespace

const std::vector<KeySpec>& deck_keys() {
  static const std::vector<KeySpec> keys = {
      // ---- [run] -----------------------------------------------------------------------------
      {.name = "run.device", .type = T::String, .def = "cpu", .choices = {"cpu", "cuda"},
       .help = "compute backend"},
      {.name = "run.threads", .type = T::Int, .def = "0", .min = 0,
       .help = "CPU threads per rank (0: all cores)"},
      {.name = "run.name", .type = T::String, .def = "dsv3", .help = "run name (logs, metrics)"},

      // ---- [model]: HF DeepSeek-V3 config; model.hf_config is read first, given keys override it --
      {.name = "model.hf_config", .type = T::Path, .def = kNone,
       .help = "Hugging Face config.json of the model"},
      {.name = "model.hf_weights", .type = T::Path, .def = kNone,
       .help = "directory of HF safetensors to initialize from (default: random init)"},
      {.name = "model.vocab_size", .type = T::Int, .min = 1, .help = "vocabulary size"},
      {.name = "model.hidden_size", .type = T::Int, .min = 1, .help = "model width"},
      {.name = "model.intermediate_size", .type = T::Int, .min = 1,
       .help = "dense SwiGLU MLP hidden size"},
      {.name = "model.moe_intermediate_size", .type = T::Int, .min = 1,
       .help = "hidden size of one routed/shared expert"},
      {.name = "model.num_hidden_layers", .type = T::Int, .min = 1,
       .help = "transformer layers (without MTP modules)"},
      {.name = "model.first_k_dense_replace", .type = T::Int, .min = 0,
       .help = "the first k layers use a dense MLP instead of MoE"},
      {.name = "model.moe_layer_freq", .type = T::Int, .min = 1,
       .help = "every n-th layer after the dense ones is MoE"},
      {.name = "model.num_attention_heads", .type = T::Int, .min = 1, .help = "attention heads"},
      {.name = "model.num_key_value_heads", .type = T::Int, .min = 1,
       .help = "key/value heads (MLA: equal to num_attention_heads)"},
      {.name = "model.q_lora_rank", .type = T::Int, .min = 0,
       .help = "MLA query compression rank (0: no query compression)"},
      {.name = "model.kv_lora_rank", .type = T::Int, .min = 1, .help = "MLA key/value compression rank"},
      {.name = "model.qk_nope_head_dim", .type = T::Int, .min = 1,
       .help = "per-head query/key dim without rotary embedding"},
      {.name = "model.qk_rope_head_dim", .type = T::Int, .min = 1,
       .help = "per-head query/key dim with rotary embedding"},
      {.name = "model.v_head_dim", .type = T::Int, .min = 1, .help = "per-head value dim"},
      {.name = "model.n_routed_experts", .type = T::Int, .min = 1, .help = "routed experts per MoE layer"},
      {.name = "model.n_shared_experts", .type = T::Int, .min = 0, .help = "shared experts per MoE layer"},
      {.name = "model.num_experts_per_tok", .type = T::Int, .min = 1, .help = "routed experts per token (top-k)"},
      {.name = "model.n_group", .type = T::Int, .min = 1, .help = "expert groups for group-limited routing"},
      {.name = "model.topk_group", .type = T::Int, .min = 1, .help = "groups a token may route to"},
      {.name = "model.routed_scaling_factor", .type = T::Float, .min = 0, .min_exclusive = true,
       .help = "scale of the routed experts' output"},
      {.name = "model.norm_topk_prob", .type = T::Bool, .help = "normalize the top-k routing weights"},
      {.name = "model.scoring_func", .type = T::String, .choices = {"sigmoid"},
       .help = "router scoring function"},
      {.name = "model.topk_method", .type = T::String,
       .choices = {"noaux_tc", "greedy", "group_limited_greedy"}, .help = "expert selection method"},
      {.name = "model.rms_norm_eps", .type = T::Float, .min = 0, .min_exclusive = true,
       .help = "RMSNorm epsilon"},
      {.name = "model.rope_theta", .type = T::Float, .min = 0, .min_exclusive = true, .help = "RoPE base"},
      {.name = "model.max_position_embeddings", .type = T::Int, .min = 1,
       .help = "longest sequence the model supports"},
      {.name = "model.num_nextn_predict_layers", .type = T::Int, .min = 0,
       .help = "multi-token prediction (MTP) modules"},
      {.name = "model.tie_word_embeddings", .type = T::Bool,
       .help = "share the input embedding with the output head"},
      {.name = "model.bos_token_id", .type = T::Int, .min = 0, .help = "begin-of-sequence token"},
      {.name = "model.eos_token_id", .type = T::Int, .min = 0, .help = "end-of-sequence token"},
      {.name = "model.aux_loss_alpha", .type = T::Float, .min = 0,
       .help = "HF sequence-wise auxiliary loss weight (training uses train.aux_alpha)"},
      {.name = "model.initializer_range", .type = T::Float, .min = 0,
       .help = "std of the random weight initialization"},
      {.name = "model.rope_interleave", .type = T::Bool,
       .help = "rotary dims are interleaved pairs (DeepSeek checkpoints)"},
      {.name = "model.rope_scaling.type", .type = T::String, .choices = {"yarn"},
       .help = "RoPE scaling method"},
      {.name = "model.rope_scaling.factor", .type = T::Float, .min = 0, .min_exclusive = true,
       .help = "YaRN context extension factor"},
      {.name = "model.rope_scaling.original_max_position_embeddings", .type = T::Int, .min = 1,
       .help = "YaRN: context length before extension"},
      {.name = "model.rope_scaling.beta_fast", .type = T::Float, .min = 0, .help = "YaRN beta_fast"},
      {.name = "model.rope_scaling.beta_slow", .type = T::Float, .min = 0, .help = "YaRN beta_slow"},
      {.name = "model.rope_scaling.mscale", .type = T::Float, .min = 0, .help = "YaRN mscale"},
      {.name = "model.rope_scaling.mscale_all_dim", .type = T::Float, .min = 0,
       .help = "YaRN mscale_all_dim"},

      // ---- [train] ---------------------------------------------------------------------------
      {.name = "train.iters", .type = T::Int, .required = true, .min = 1,
       .help = "training iterations (optimizer steps)"},
      {.name = "train.seed", .type = T::Int, .def = "1234", .min = 0,
       .help = "seed of the initialization and data order"},
      {.name = "train.micro_batch", .type = T::Int, .def = "1", .min = 1,
       .help = "sequences per micro-batch per data-parallel rank"},
      {.name = "train.global_batch", .type = T::Int, .required = true, .min = 1,
       .help = "sequences per optimizer step over all ranks"},
      {.name = "train.seq_length", .type = T::Int, .required = true, .min = 1,
       .help = "tokens per training sequence"},
      {.name = "train.eval_interval", .type = T::Int, .def = "0", .min = 0,
       .help = "evaluate every n iterations (0: never)"},
      {.name = "train.eval_iters", .type = T::Int, .def = "0", .min = 0,
       .help = "batches per evaluation"},
      {.name = "train.mtp_lambda", .type = T::Float, .def = "0.3", .min = 0,
       .help = "weight of the multi-token-prediction loss"},
      {.name = "train.aux_alpha", .type = T::Float, .def = "0.0001", .min = 0,
       .help = "weight of the sequence-wise balance loss"},

      // ---- [optim] ---------------------------------------------------------------------------
      {.name = "optim.lr", .type = T::Float, .def = "3e-4", .min = 0, .help = "peak learning rate"},
      {.name = "optim.min_lr", .type = T::Float, .def = "3e-5", .min = 0,
       .help = "final learning rate of the decay"},
      {.name = "optim.warmup_iters", .type = T::Int, .def = "0", .min = 0,
       .help = "linear warmup iterations"},
      {.name = "optim.lr_schedule", .type = T::String, .def = "constant",
       .choices = {"constant", "cosine", "multiphase"}, .help = "learning-rate schedule after warmup"},
      {.name = "optim.beta1", .type = T::Float, .def = "0.9", .min = 0, .max = 1, .max_exclusive = true,
       .help = "AdamW beta1"},
      {.name = "optim.beta2", .type = T::Float, .def = "0.95", .min = 0, .max = 1, .max_exclusive = true,
       .help = "AdamW beta2"},
      {.name = "optim.eps", .type = T::Float, .def = "1e-8", .min = 0, .min_exclusive = true,
       .help = "AdamW epsilon"},
      {.name = "optim.weight_decay", .type = T::Float, .def = "0.1", .min = 0,
       .help = "decoupled weight decay"},
      {.name = "optim.clip_grad", .type = T::Float, .def = "1.0", .min = 0,
       .help = "global gradient-norm clip (0: off)"},
      {.name = "optim.param_dtype", .type = T::String, .def = "fp32", .choices = {"fp32", "bf16"},
       .help = "dtype of the parameters"},
      {.name = "optim.grad_dtype", .type = T::String, .def = "fp32", .choices = {"fp32", "bf16"},
       .help = "dtype of the gradients"},
      {.name = "optim.moment_dtype", .type = T::String, .def = "fp32", .choices = {"fp32", "bf16"},
       .help = "dtype of the AdamW moments"},

      // ---- [moe] -----------------------------------------------------------------------------
      {.name = "moe.bias_update_rate", .type = T::Float, .def = "0.001", .min = 0,
       .help = "aux-loss-free balancing: expert bias update speed"},

      // ---- [parallel] ------------------------------------------------------------------------
      {.name = "parallel.tp", .type = T::Int, .def = "1", .min = 1, .help = "tensor-parallel size"},
      {.name = "parallel.pp", .type = T::Int, .def = "1", .min = 1, .help = "pipeline-parallel size"},
      {.name = "parallel.ep", .type = T::Int, .def = "1", .min = 1, .help = "expert-parallel size"},
      {.name = "parallel.etp", .type = T::Int, .def = "1", .min = 1,
       .help = "tensor-parallel size inside an expert"},
      {.name = "parallel.dp", .type = T::Int, .def = "0", .min = 0,
       .help = "data-parallel size (0: derived from the world size)"},
      {.name = "parallel.sp", .type = T::Bool, .def = "false",
       .help = "sequence parallelism (with tp > 1)"},
      {.name = "parallel.pp_layout", .type = T::String, .def = "",
       .help = "pipeline layout in Megatron syntax (empty: even split)"},

      // ---- [data] ----------------------------------------------------------------------------
      {.name = "data.paths", .type = T::String, .def = "",
       .help = "weighted dataset prefixes, e.g. \"0.7 a 0.3 b\" (relative to the deck's directory)"},
      {.name = "data.split", .type = T::String, .def = "98,2,0", .help = "train,valid,test weights"},
      {.name = "data.cache_dir", .type = T::Path, .def = "",
       .help = "directory for index caches (empty: next to the data)"},

      // ---- [log] -----------------------------------------------------------------------------
      {.name = "log.level", .type = T::String, .def = "info",
       .choices = {"trace", "debug", "info", "warning", "error"}, .help = "lowest severity printed"},
      {.name = "log.all_ranks", .type = T::Bool, .def = "false",
       .help = "every rank logs (default: rank 0; errors always)"},
      {.name = "log.metrics", .type = T::Path, .def = "", .help = "JSON-lines metrics file (empty: none)"},
      {.name = "log.interval", .type = T::Int, .def = "1", .min = 1, .help = "log every n iterations"},

      // ---- [checkpoint] ----------------------------------------------------------------------
      {.name = "checkpoint.dir", .type = T::Path, .def = "", .help = "checkpoint directory (empty: none)"},
      {.name = "checkpoint.interval", .type = T::Int, .def = "0", .min = 0,
       .help = "save every n iterations (0: no periodic saves)"},
      {.name = "checkpoint.keep", .type = T::Int, .def = "0", .min = 0,
       .help = "keep the newest n checkpoints (0: all)"},
      {.name = "checkpoint.load", .type = T::Path, .def = "",
       .help = "resume from: \"\" (none), auto (newest in dir) or a checkpoint path"},
      {.name = "checkpoint.finetune", .type = T::Bool, .def = "false",
       .help = "load weights only (fresh optimizer, iteration 0)"},
  };
  return keys;
}

}  // namespace dsv3
