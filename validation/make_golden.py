#!/usr/bin/python3
"""Writes a complete golden directory (same layout as tests/golden/tiny) for any DeepSeek-V3 config.

    /usr/bin/python3 validation/make_golden.py CONFIG_JSON OUTDIR [--seed N] [--batch B --seq S]
                     [--mtp-lambda 0.3] [--aux-alpha A] [--no-f64] [--name NAME]

Files: config.json (+ quantization_config fp8 e4m3 block [16,16]), model.safetensors (test initialisation of
tests/golden/tiny/README.md), model-fp8.safetensors, model-fp8-dequant.safetensors, golden.safetensors (every
key of the README table), train.json, report.json, README.md. All numerics come from
validation/torch_ref/dsv3_ref.py (float32, 1 thread); validation/torch_ref/check_tiny.py OUTDIR re-checks a
written directory.

Robustness (README): weight seeds N, N+1, ... are drawn until the step-0 forward has every min expert gap
(k-th vs (k+1)-th selection score) and group gap > 1e-3; each later training batch, the generation prompt and
the FP8 input are redrawn until every gap of that forward (with the parameters of that step) exceeds 1e-3, and
for generation also every greedy top1-top2 logit gap. The k-th selected biased score must stay > 0 so that HF's
0.0 group masking is equivalent to -inf.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_ref"))
import dsv3_ref as R  # noqa: E402

GAP = 1e-3
MAX_TRIES = 2000
QUANT_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [16, 16]}


def robust(g):
    return g["min_expert_gap"] > GAP and g["min_group_gap"] > GAP and g["kth_selected_biased_score_min"] > 0


def draw_ids(seed, shape, V):
    return np.random.default_rng(seed).integers(0, V, size=shape, dtype=np.int64)


def search(base, fn):
    """Tries seeds base, base+1, ... until fn(seed) returns a non-None value; returns (value, seed, tries)."""
    for t in range(MAX_TRIES):
        v = fn(base + t)
        if v is not None:
            return v, base + t, t + 1
    raise RuntimeError(f"no robust draw found from seed {base} in {MAX_TRIES} tries")


def f64_replay(config, tensors, g32, hp):
    """Replays the identical computation (same inputs) in float64; returns the max abs differences."""
    g64, _ = R.compute_golden(
        config, tensors,
        choose_batch=lambda s, m: (g32[f"input_ids_step{s}"], {}),
        choose_prompt=lambda m: (g32["generate.prompt"], {}),
        choose_fp8_input=lambda m: (g32["fp8_check.input_ids"], {}),
        hp=hp, dtype=torch.float64)

    def d(k):
        return float(np.abs(g32[k].astype(np.float64) - g64[k]).max())

    r = {"routing_identical_step0": all(np.array_equal(g32[k], g64[k]) for k in g32 if k.startswith("routing.topk_idx")),
         "logits": d("logits"), "mtp_logits": d("mtp_logits"),
         "lm_loss": d("lm_loss"), "mtp_loss": d("mtp_loss"), "aux_loss": d("aux_loss"),
         "hidden_max": max(d(k) for k in g32 if k.startswith("hidden.")),
         "grad_abs": max(d(k) for k in g32 if k.startswith("grad."))}
    rel = [np.abs(g32[k].astype(np.float64) - g64[k]).ravel() / max(float(np.abs(g32[k]).max()), 1e-30)
           for k in g32 if k.startswith("grad.")]
    rel = np.concatenate(rel)
    r["grad_rel_to_tensor_max"] = float(rel.max())
    loads_same = all(np.array_equal(g32[k], g64[k]) for k in g32 if k.startswith("train.expert_load"))
    for s in range(3):
        r[f"train_total_loss_step{s}"] = float(abs(float(g32["train.total_loss"][s]) - float(g64["train.total_loss"][s])))
        r[f"train_grad_norm_step{s}"] = float(abs(float(g32["train.grad_norm"][s]) - float(g64["train.grad_norm"][s])))
    r["train_expert_loads_identical"] = loads_same
    p = [np.abs(g32[k].astype(np.float64) - g64[k]).ravel() for k in g32
         if k.startswith("step3.") and not k.endswith("e_score_correction_bias")]
    p = np.concatenate(p)
    r["step3_param_abs"] = float(p.max())
    r["step3_param_abs_quantiles"] = {str(q): float(np.quantile(p, q)) for q in (0.5, 0.99, 0.999, 0.9999)}
    r["step3_param_count"] = int(p.size)
    r["step3_param_count_abs_gt"] = {t: int((p > float(t)).sum()) for t in ("1e-6", "1e-5", "1e-4")}
    r["step3_param_frac_within_2e-5"] = float((p <= 2e-5).mean())
    r["grad_rel_to_tensor_max_count_gt"] = {t: int((rel > float(t)).sum()) for t in ("1e-6", "1e-5")}
    r["step3_bias_abs"] = max(d(k) for k in g32 if k.endswith("e_score_correction_bias") and k.startswith("step3."))
    r["fp8_check_logits"] = d("fp8_check.logits")
    r["generate_tokens_identical"] = bool(np.array_equal(g32["generate.greedy_tokens"], g64["generate.greedy_tokens"]))
    # the README tolerances, applied to float32 vs float64
    r["within_readme_tolerances"] = bool(
        r["routing_identical_step0"] and loads_same and r["generate_tokens_identical"]
        and max(r["logits"], r["mtp_logits"], r["hidden_max"], r["fp8_check_logits"]) <= 1e-4
        and max(r["lm_loss"], r["mtp_loss"], r["aux_loss"]) <= 1e-5
        and max(r[f"train_total_loss_step{s}"] for s in range(3)) <= 1e-5
        and r["grad_rel_to_tensor_max"] <= 1e-4 and r["step3_bias_abs"] <= 1e-6
        and r["step3_param_frac_within_2e-5"] >= 0.999 and r["step3_param_abs"] <= 1e-2)
    return r


def readme(name, cfg, B, S, rep, train, files):
    c = R.Config(cfg)
    inv, scale, att = R.rope_params(c)
    f = rep["float32_vs_float64"]
    moe_layers = [i for i in range(c.L + c.n_mtp) if c.is_moe(i)]
    lines = [
        f"# DeepSeek-V3 golden test set `{name}`", "",
        "Generated by `validation/make_golden.py` with the independent PyTorch reference "
        "`validation/torch_ref/dsv3_ref.py` (PyTorch " + torch.__version__ + " CPU, float32, 1 thread), which "
        "reproduces every key of `tests/golden/tiny` within its tolerances "
        "(`validation/torch_ref/check_tiny.py`).",
        "**All conventions, the file layout, the key table of `golden.safetensors` and the recommended tolerances "
        "are those of `tests/golden/tiny/README.md`**; this file only lists what differs.", "",
        "## Model", "",
        f"vocab {c.V}, hidden {c.D}, {c.L} layers (first {c.first_dense} dense SwiGLU with intermediate {c.inter}, "
        f"then MoE), heads {c.H}, q_lora_rank {json.dumps(cfg.get('q_lora_rank'))} "
        + ("(**no q LoRA: `self_attn.q_proj`**)" if not c.q_lora else "")
        + f", kv_lora_rank {c.kv_lora}, qk_nope {c.dn}, qk_rope {c.dr}, v_head {c.dv}; MoE: {c.E} routed experts "
        f"(moe_intermediate {c.moe_inter}) in {c.G} groups, top-{c.topk_group} groups, top-{c.K} experts, "
        f"{c.n_shared} shared experts (one `shared_experts` MLP of intermediate {c.moe_inter * c.n_shared}), "
        f"routed_scaling_factor {c.rsf}; {c.n_mtp} MTP module = `model.layers.{c.L}`; rms eps {c.eps}; "
        f"rope_theta {c.theta}, "
        + (f"YaRN factor {c.rope_scaling['factor']} from original_max_position_embeddings "
           f"{c.rope_scaling['original_max_position_embeddings']} (max_position_embeddings "
           f"{cfg['max_position_embeddings']})" if c.rope_scaling else "no rope scaling")
        + f". Batch {B} x sequence {S}. MoE layers: {', '.join(f'model.layers.{i}.mlp' for i in moe_layers)}.", "",
        "Weights: the deterministic test initialization of the tiny README. Training: mtp_lambda "
        f"{train['mtp_lambda']}, aux_alpha {train['aux_alpha']} (= the config's aux_loss_alpha), otherwise as tiny "
        "(see `train.json`).", "",
        f"Derived numbers: rope inv_freq = {[float(f'{x:.9g}') for x in inv]}; softmax scale = "
        f"qk_head_dim^-0.5 * mscale^2 = {scale:.9f}; cos/sin attention factor = {att:g}.", "",
        "Tied parameters as in tiny: `model.layers.L.embed_tokens.weight` == `model.embed_tokens.weight` (grad./step3. "
        "key `model.embed_tokens.weight`) and `model.layers.L.shared_head.head.weight` == `lm_head.weight` (grad./step3. "
        "key `model.layers.L.shared_head.head.weight`, as in tiny).", "",
        "## Robustness of discrete decisions", "",
        f"* Weights seed {rep['weight_seed']} ({rep['weight_seed_tries']} tries); step-0 min expert gap "
        f"{rep['step0']['min_expert_gap']:.2e}, min group gap {rep['step0']['min_group_gap']:.2e}; the bias changes the "
        f"selection of {sum(rep['step0']['n_bias_changed'].values())} token-layer pairs at step 0; min k-th selected "
        f"biased score {rep['step0']['kth_selected_biased_score_min']:.3f}.",
    ]
    for s in train["steps"]:
        lines.append(f"* Training step {s['step']}: batch seed {s['batch_seed']} ({s['batch_tries']} tries), min expert gap "
                     f"{s['min_expert_gap']:.2e}, min group gap {s['min_group_gap']:.2e}; grad norm "
                     f"{s['grad_norm_before_clip']:.4f} (clip coef {s['clip_coef']:.4f}).")
    gr, fp = rep["generate"], rep["fp8"]
    lines += [
        f"* Generation: prompt seed {gr['prompt_seed']} ({gr['tries']} tries), min expert gap {gr['min_expert_gap']:.2e}, "
        f"min group gap {gr['min_group_gap']:.2e}, min top1-top2 logit gap {gr['min_top1_top2_logit_gap']:.2e}.",
        f"* FP8 check input: seed {fp['input_seed']} ({fp['tries']} tries), min expert gap {fp['min_expert_gap']:.2e}, "
        f"min group gap {fp['min_group_gap']:.2e}; {fp['n_quantized_tensors']} quantized tensors, largest dequantization "
        f"error relative to a tensor's max abs {fp['max_rel_dequant_err']:.2e}.", "",
    ]
    if f:
        lines += [
            "## float32 vs float64 replay (same inputs)", "",
            "| quantity | max abs diff |", "|---|---|",
            f"| logits / mtp_logits | {f['logits']:.2e} / {f['mtp_logits']:.2e} |",
            f"| hidden.* | {f['hidden_max']:.2e} |",
            f"| lm_loss / mtp_loss / aux_loss | {f['lm_loss']:.2e} / {f['mtp_loss']:.2e} / {f['aux_loss']:.2e} |",
            f"| grad.* | {f['grad_abs']:.2e} abs, {f['grad_rel_to_tensor_max']:.2e} relative to the tensor's max abs |",
            f"| train.total_loss steps 0/1/2 | {f['train_total_loss_step0']:.2e} / {f['train_total_loss_step1']:.2e} / "
            f"{f['train_total_loss_step2']:.2e} |",
            f"| step3 parameters | max {f['step3_param_abs']:.2e}; 99.9% quantile "
            f"{f['step3_param_abs_quantiles']['0.999']:.2e}; {f['step3_param_count_abs_gt']['1e-5']} of "
            f"{f['step3_param_count']} elements > 1e-5 |",
            f"| step3 e_score_correction_bias | {f['step3_bias_abs']:.2e} |",
            f"| fp8_check.logits | {f['fp8_check_logits']:.2e} |",
            f"| routing / expert loads / greedy tokens | identical: {f['routing_identical_step0'] and f['train_expert_loads_identical'] and f['generate_tokens_identical']} |",
            "", f"All within the tiny README's recommended tolerances: {f['within_readme_tolerances']}.", "",
        ]
    lines += ["## Files", "", "| file | bytes |", "|---|---|"] + [f"| `{k}` | {v} |" for k, v in sorted(files.items())]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("outdir")
    ap.add_argument("--seed", type=int, default=1000, help="first weight seed; also offsets every other seed")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--mtp-lambda", type=float, default=0.3)
    ap.add_argument("--aux-alpha", type=float, default=None, help="default: the config's aux_loss_alpha")
    ap.add_argument("--no-f64", action="store_true", help="skip the float64 replay")
    ap.add_argument("--name", default=None, help="case name (default: OUTDIR's basename)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    name = a.name or os.path.basename(os.path.normpath(a.outdir))
    config = json.load(open(a.config))
    config = dict(config, quantization_config=QUANT_CONFIG)
    cfg = R.Config(config)
    assert cfg.n_mtp == 1, "the golden layout needs exactly one MTP module"
    B, S, V, N = a.batch, a.seq, cfg.V, a.seed
    hp = dict(R.DEFAULT_HP, mtp_lambda=a.mtp_lambda, aux_alpha=cfg.aux_alpha if a.aux_alpha is None else a.aux_alpha)

    # 1) weights: redraw until the step-0 forward (batch seed 500000 + weight seed) is robust
    def try_weights(seed):
        t = R.init_tensors(cfg, seed)
        ids = draw_ids(500000 + seed, (B, S), V)
        with torch.no_grad():
            out = R.DeepSeekV3(config, t).forward(ids)
        g = R.min_gaps(out["routing"])
        return (t, ids, g) if robust(g) else None

    (tensors, ids0, gaps0), wseed, wtries = search(N, try_weights)
    print(f"weight seed {wseed} ({wtries} tries): {gaps0}", flush=True)

    # 2) later batches / prompt / fp8 input, each redrawn until robust with the parameters it meets
    def choose_batch(step, model):
        if step == 0:
            return ids0, {"batch_seed": 500000 + wseed, "batch_tries": 1}

        def f(seed):
            ids = draw_ids(seed, (B, S), V)
            with torch.no_grad():
                out = model.forward(ids)
            return ids if robust(R.min_gaps(out["routing"])) else None

        ids, seed, tries = search((step + 1) * 1000000 + N, f)
        print(f"step {step}: batch seed {seed} ({tries} tries)", flush=True)
        return ids, {"batch_seed": seed, "batch_tries": tries}

    def choose_prompt(model):
        def f(seed):
            p = draw_ids(seed, (1, 5), V)
            _, _, g = R.greedy_generate(model, p, 16)
            return p if robust(g) and g["min_top1_top2_logit_gap"] > GAP else None

        p, seed, tries = search(900000 + N, f)
        return p, {"prompt_seed": seed, "tries": tries}

    def choose_fp8_input(model):
        def f(seed):
            ids = draw_ids(seed, (1, 16), V)
            with torch.no_grad():
                out = model.forward(ids, mtp=False)
            return ids if robust(R.min_gaps(out["routing"])) else None

        ids, seed, tries = search(1700000 + N, f)
        return ids, {"input_seed": seed, "tries": tries}

    golden, info = R.compute_golden(config, tensors, choose_batch, choose_prompt, choose_fp8_input, hp=hp)

    # 3) files
    os.makedirs(a.outdir, exist_ok=True)
    with open(os.path.join(a.outdir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    R.save_safetensors(os.path.join(a.outdir, "model.safetensors"), tensors)
    fp8, fp8_names, deq = R.quantize_checkpoint(tensors, tuple(QUANT_CONFIG["weight_block_size"]))
    R.save_safetensors(os.path.join(a.outdir, "model-fp8.safetensors"), fp8, fp8_names=fp8_names)
    R.save_safetensors(os.path.join(a.outdir, "model-fp8-dequant.safetensors"), deq)
    R.save_safetensors(os.path.join(a.outdir, "golden.safetensors"), golden)

    model0 = R.DeepSeekV3(config, tensors)
    gn = lambda k: R.golden_name(cfg, k)  # noqa: E731
    train = {
        "optimizer": "AdamW (decoupled weight decay), hand-written, as described in tests/golden/tiny/README.md",
        "update_rule": "t+=1; m=b1*m+(1-b1)*g; v=b2*v+(1-b2)*g*g; if decay: p*=(1-lr*wd); "
                       "p-=lr*(m/(1-b1^t))/(sqrt(v/(1-b2^t))+eps)",
        "lr": hp["lr"], "lr_schedule": "constant (no warmup) for the 3 steps",
        "beta1": hp["beta1"], "beta2": hp["beta2"], "eps": hp["eps"], "weight_decay": hp["weight_decay"],
        "grad_clip": {"max_norm": hp["max_norm"], "norm": "global L2 over all unique parameters (tied counted once)",
                      "rule": "coef = max_norm/(norm+1e-6); if coef < 1: g *= coef", "eps": hp["clip_eps"]},
        "loss": "total = lm_loss + mtp_lambda*mtp_loss + aux_alpha*aux_loss",
        "mtp_lambda": hp["mtp_lambda"], "aux_alpha": hp["aux_alpha"],
        "aux_loss_definition": "sum over ALL MoE layers (main + the MTP block) of the sequence-wise balance loss "
                               "(paper eq.17-20 without alpha), averaged over the sequences of the batch",
        "bias_update": {"gamma": hp["gamma"],
                        "rule": "after the optimizer step: b_i += gamma*sign(mean_j load_j - load_i), load = tokens "
                                "routed to expert i in that step's forward (whole batch), every MoE layer incl. MTP",
                        "sign(0)": 0},
        "weight_decay_applies_to": "every parameter with ndim>=2 (linear weights, router gate weights, eh_proj, "
                                   "embed_tokens, lm_head); not RMSNorm weights; e_score_correction_bias is not an "
                                   "optimizer parameter",
        "params_with_weight_decay": sorted(gn(k) for k, v in model0.params.items() if R.uses_weight_decay(k, v)),
        "params_without_weight_decay": sorted(gn(k) for k, v in model0.params.items() if not R.uses_weight_decay(k, v)),
        "tied_parameters": R.tied_names(cfg),
        "batches": {"shape": [B, S], "input_ids_step0": "== input_ids",
                    "seeds": [s["batch_seed"] for s in info["steps"]],
                    "note": "batches 1 and 2 were re-drawn until routing at that step was robust"},
        "steps": info["steps"],
        "grad_golden_note": "grad.* in golden.safetensors = raw (unclipped) gradient of the step-0 total loss "
                            "w.r.t. the initial parameters",
    }
    with open(os.path.join(a.outdir, "train.json"), "w") as f:
        json.dump(train, f, indent=1)

    s0 = info["steps"][0]
    rep = {
        "case": name, "weight_seed": wseed, "weight_seed_tries": wtries,
        "batch": [B, S],
        "step0": {k: s0[k] for k in ("lm_loss", "mtp_loss", "aux_loss", "total_loss", "min_expert_gap", "min_group_gap")},
        "generate": info["generate"], "fp8": info["fp8"],
    }
    rep["step0"]["aux_loss_if_eq18_read_literally(informational)"] = info["step0_aux_literal_eq18"]
    rep["step0"]["min_gap_of_literal_eq18_topk(informational)"] = info["step0_min_gap_literal_eq18"]
    rep["step0"]["n_bias_changed"] = {lp.split(".")[2]: n for lp, n in s0["n_tokens_whose_selection_the_bias_changed"].items()}
    rep["step0"]["kth_selected_biased_score_min"] = s0["kth_selected_biased_score_min"]
    rep["float32_vs_float64"] = {} if a.no_f64 else f64_replay(config, tensors, golden, hp)
    if rep["float32_vs_float64"] and not rep["float32_vs_float64"]["within_readme_tolerances"]:
        print("WARNING: float32 vs float64 replay exceeds the README tolerances", file=sys.stderr)

    # README.md / report.json list the file sizes (README's own size after a second pass)
    def sizes():
        return {f: os.path.getsize(os.path.join(a.outdir, f)) for f in sorted(os.listdir(a.outdir))}

    for _ in range(3):
        rep["files"] = sizes()
        rep["seconds"] = round(time.time() - t0, 1)
        with open(os.path.join(a.outdir, "report.json"), "w") as f:
            json.dump(rep, f, indent=1)
        with open(os.path.join(a.outdir, "README.md"), "w") as f:
            f.write(readme(name, config, B, S, rep, train, rep["files"]))
    total = sum(sizes().values())
    print(json.dumps({"outdir": a.outdir, "bytes": total, "seconds": rep["seconds"],
                      "f64_ok": rep["float32_vs_float64"].get("within_readme_tolerances")}))


if __name__ == "__main__":
    main()
