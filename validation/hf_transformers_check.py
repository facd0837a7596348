#!/usr/bin/env python3
"""Loads a dsv3 Hugging Face export with Hugging Face transformers (DeepseekV3ForCausalLM) and compares it
with dsv3.

Checks (see validation/README_transformers.md for how to install and the measured result):
  1. loading: missing / unexpected / mismatched keys reported by transformers (the MTP layer
     `model.layers.{num_hidden_layers}.*` is not part of transformers' model and must be the only
     unexpected keys), and the weights transformers holds are equal to the tensors in the export;
  2. greedy tokens: for each prompt, N greedy tokens from transformers (full recompute, and
     `generate()` with its KV cache) against `dsv3-generate --hf DIR` (MLA latent cache and --no-cache);
  3. logits (when a golden directory is given, default tests/golden/tiny): transformers' full-sequence
     logits for the golden `input_ids` [2,64] against golden `logits` (dsv3 itself matches them to ~4e-6,
     `dsv3-golden tests/golden/tiny --checks forward`), and for the golden `generate.prompt` the
     transformers step logits against `generate.step_logits`. With --dsv3-golden, dsv3-golden is also run
     on the export's weights (not the golden dir's) so both implementations are measured against the same
     numbers from the same files.

dsv3-generate prints no logits, so the logits comparison is transitive through the golden values:
|dsv3 - transformers| <= |dsv3 - golden| + |transformers - golden|.

    /tmp/venv-hf/bin/python validation/hf_transformers_check.py /tmp/hfcheck/hf --dsv3-golden
Exit status 0 when every check passes, 1 otherwise.
"""
import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import torch
from safetensors import safe_open

# ~20-token second prompt (fixed; drawn once with numpy default_rng(20).integers(2, 512, 20))
LONG_PROMPT = [int(x) for x in np.random.default_rng(20).integers(2, 512, 20)]


def log(msg=""):
    print(msg, flush=True)


def load_export_tensors(hf_dir):
    tensors = {}
    for f in sorted(glob.glob(os.path.join(hf_dir, "*.safetensors"))):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                tensors[k] = h.get_tensor(k)
    return tensors


def load_model(hf_dir, attn):
    import transformers
    from transformers import DeepseekV3ForCausalLM
    kw = dict(output_loading_info=True, attn_implementation=attn)
    major = int(transformers.__version__.split(".")[0])
    kw["dtype" if major >= 5 else "torch_dtype"] = torch.float32
    model, info = DeepseekV3ForCausalLM.from_pretrained(hf_dir, **kw)
    model.eval()
    return model, info


def check_loading(model, info, files, n_layers):
    ok = True
    missing = sorted(info.get("missing_keys", []))
    unexpected = sorted(info.get("unexpected_keys", []))
    mismatched = list(info.get("mismatched_keys", []))
    errors = list(info.get("error_msgs", []))
    mtp_prefix = f"model.layers.{n_layers}."
    non_mtp_unexpected = [k for k in unexpected if not k.startswith(mtp_prefix)]
    log(f"loading: {len(missing)} missing, {len(unexpected)} unexpected "
        f"({len(unexpected) - len(non_mtp_unexpected)} of them the MTP layer {mtp_prefix}*), "
        f"{len(mismatched)} mismatched, {len(errors)} errors")
    for name, lst in (("missing", missing), ("unexpected (not MTP)", non_mtp_unexpected),
                      ("mismatched", mismatched), ("error", errors)):
        if lst:
            ok = False
            log(f"  {name}: {lst[:20]}{' ...' if len(lst) > 20 else ''}")
    n_mtp_files = sum(1 for k in files if k.startswith(mtp_prefix))
    log(f"  MTP tensors in the export: {n_mtp_files}; transformers has {len(model.model.layers)} decoder "
        f"layers (num_hidden_layers {n_layers}), so the MTP module is not loaded (ignored)")

    # the weights transformers holds == the export's tensors (catches a silent layout conversion error)
    sd = model.state_dict()
    compared, max_diff, bad = 0, 0.0, []
    expert_re = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
    fused = {}
    for k, v in files.items():
        if k.startswith(mtp_prefix):
            continue
        m = expert_re.match(k)
        if m and k not in sd:
            fused.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = v
            continue
        if k not in sd:
            bad.append(f"{k}: not in transformers' state_dict")
            continue
        d = (sd[k].float() - v.float()).abs().max().item() if sd[k].shape == v.shape else float("inf")
        compared += 1
        max_diff = max(max_diff, d)
        if d != 0:
            bad.append(f"{k}: max diff {d:.3e}")
    for prefix, experts in fused.items():
        n = len(experts)
        gate = torch.stack([experts[e]["gate"] for e in range(n)])
        up = torch.stack([experts[e]["up"] for e in range(n)])
        down = torch.stack([experts[e]["down"] for e in range(n)])
        if prefix + ".gate_up_proj" in sd:   # transformers >= 5: fused [E, 2*I, D] and [E, D, I]
            pairs = [(prefix + ".gate_up_proj", torch.cat([gate, up], dim=1)), (prefix + ".down_proj", down)]
        else:
            pairs = []
            bad.append(f"{prefix}: unknown expert layout in transformers' state_dict")
        for name, ref in pairs:
            t = sd[name]
            d = (t.float() - ref.float()).abs().max().item() if t.shape == ref.shape else float("inf")
            compared += 2 * n if name.endswith("gate_up_proj") else n
            max_diff = max(max_diff, d)
            if d != 0:
                bad.append(f"{name}: max diff {d:.3e} (shape {tuple(t.shape)} vs {tuple(ref.shape)})")
    log(f"  weights held by transformers vs export: {compared} file tensors compared, max abs diff "
        f"{max_diff:.3e}" + ("" if not bad else f"; {len(bad)} differ: {bad[:10]}"))
    return ok and not bad


@torch.no_grad()
def hf_greedy_nocache(model, prompt, n):
    ids = torch.tensor([prompt], dtype=torch.long)
    toks, step_logits = [], []
    for _ in range(n):
        logits = model(input_ids=ids, use_cache=False).logits[0, -1].float()
        t = int(torch.argmax(logits))
        toks.append(t)
        step_logits.append(logits)
        ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
    return toks, torch.stack(step_logits)


@torch.no_grad()
def hf_greedy_generate(model, prompt, n):
    from transformers import GenerationConfig
    gc = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                          pad_token_id=0, bos_token_id=None, use_cache=True)
    ids = torch.tensor([prompt], dtype=torch.long)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gc)
    return [int(x) for x in out[0, len(prompt):]]


def dsv3_generate(exe, hf_dir, prompt, n, no_cache):
    cmd = [exe, "--hf", hf_dir, "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", str(n)]
    if no_cache:
        cmd.append("--no-cache")
    r = subprocess.run(cmd, capture_output=True, text=True)
    m = re.search(r"^generated:\s*(.*)$", r.stdout, re.M)
    if r.returncode != 0 or not m:
        raise RuntimeError(f"{' '.join(cmd)} failed (rc {r.returncode}):\n{r.stdout}\n{r.stderr}")
    return [int(x) for x in m.group(1).replace(",", " ").split()]


def run_dsv3_golden(exe, hf_dir, golden_dir):
    """Runs dsv3-golden on the export's config + weights with the golden expected values."""
    with tempfile.TemporaryDirectory() as d:
        os.symlink(os.path.abspath(os.path.join(hf_dir, "config.json")), os.path.join(d, "config.json"))
        shards = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
        if len(shards) == 1:
            os.symlink(os.path.abspath(shards[0]), os.path.join(d, "model.safetensors"))
        else:
            for f in shards + glob.glob(os.path.join(hf_dir, "*.index.json")):
                os.symlink(os.path.abspath(f), os.path.join(d, os.path.basename(f)))
        os.symlink(os.path.abspath(os.path.join(golden_dir, "golden.safetensors")),
                   os.path.join(d, "golden.safetensors"))
        r = subprocess.run([exe, d, "--checks", "forward,generate"], capture_output=True, text=True)
    lines = [l for l in r.stdout.splitlines()
             if l.startswith(("logits ", "generate.", "mtp_logits ")) or "passed" in l]
    return r.returncode, lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hf_dir", help="dsv3 Hugging Face export (config.json + safetensors)")
    ap.add_argument("--prompt-ids", action="append", default=None,
                    help="comma-separated prompt ids; repeatable (default: the golden generate.prompt and a "
                         "fixed 20-token prompt)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--dsv3-build", default="build", help="directory with dsv3-generate / dsv3-golden")
    ap.add_argument("--golden", default=None,
                    help="golden directory for the logits comparison (default tests/golden/tiny when the "
                         "export's config matches it; 'none' to skip)")
    ap.add_argument("--dsv3-golden", action="store_true",
                    help="also run dsv3-golden on the export's weights against the golden values")
    ap.add_argument("--attn", default="eager", help="transformers attn_implementation (eager|sdpa)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 = deterministic)")
    ap.add_argument("--logit-tol", type=float, default=1e-4)
    args = ap.parse_args()

    import transformers
    torch.set_num_threads(args.threads)
    log(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"numpy {np.__version__}")
    with open(os.path.join(args.hf_dir, "config.json")) as f:
        cfg = json.load(f)
    n_layers = cfg["num_hidden_layers"]
    log(f"export {args.hf_dir}: model_type {cfg.get('model_type')}, rope_interleave {cfg.get('rope_interleave')}, "
        f"rope_scaling {cfg.get('rope_scaling', {}).get('type')}, {n_layers} layers + "
        f"{cfg.get('num_nextn_predict_layers', 0)} MTP, vocab {cfg['vocab_size']}")

    ok = True
    files = load_export_tensors(args.hf_dir)
    model, info = load_model(args.hf_dir, args.attn)
    log(f"transformers model: {type(model).__name__}, attn {model.config._attn_implementation}, "
        f"rope_interleave {getattr(model.config, 'rope_interleave', None)}")
    if not cfg.get("rope_interleave", False):
        log("  FAIL: the export's config.json does not set rope_interleave: true (dsv3 writes the interleaved "
            "RoPE layout of the released weights)")
        ok = False
    elif not getattr(model.config, "rope_interleave", False):
        log("  FAIL: this transformers version does not read rope_interleave (needs a version whose "
            "modeling_deepseek_v3.py has apply_rotary_pos_emb_interleave, >= 4.51)")
        ok = False
    ok &= check_loading(model, info, files, n_layers)

    # golden directory
    golden_dir = args.golden
    if golden_dir is None:
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        cand = os.path.join(repo, "tests", "golden", "tiny")
        if os.path.exists(os.path.join(cand, "golden.safetensors")):
            with open(os.path.join(cand, "config.json")) as f:
                gcfg = json.load(f)
            same = all(gcfg.get(k) == cfg.get(k) for k in ("hidden_size", "num_hidden_layers", "vocab_size",
                                                           "n_routed_experts", "q_lora_rank", "kv_lora_rank"))
            golden_dir = cand if same else None
    elif golden_dir == "none":
        golden_dir = None
    golden = None
    if golden_dir:
        golden = {}
        with safe_open(os.path.join(golden_dir, "golden.safetensors"), "pt") as h:
            for k in ("input_ids", "logits", "generate.prompt", "generate.greedy_tokens", "generate.step_logits"):
                golden[k] = h.get_tensor(k)
        # are the export's weights those of the golden model? (else the golden logits do not apply)
        gw = {}
        for f in glob.glob(os.path.join(golden_dir, "model.safetensors")):
            with safe_open(f, "pt") as h:
                gw = {k: h.get_tensor(k) for k in h.keys()}
        wd = max(((files[k].float() - v.float()).abs().max().item() if k in files else float("inf"))
                 for k, v in gw.items())
        log(f"golden {golden_dir}: export weights vs golden model.safetensors: {len(gw)} tensors, "
            f"max abs diff {wd:.3e}")
        if wd != 0:
            log("  the export is not the golden model: golden logits comparison skipped")
            golden = None

    # logits vs golden
    if golden is not None:
        with torch.no_grad():
            lg = model(input_ids=golden["input_ids"], use_cache=False).logits.float()
        ref = golden["logits"]
        d = (lg - ref).abs()
        same_argmax = (lg.argmax(-1) == ref.argmax(-1)).float().mean().item()
        log(f"logits input_ids {list(golden['input_ids'].shape)}: transformers vs golden max abs diff "
            f"{d.max().item():.3e} (mean {d.mean().item():.3e}, max |golden| {ref.abs().max().item():.2f}), "
            f"argmax agreement {100 * same_argmax:.1f}% -> {'PASS' if d.max().item() <= args.logit_tol else 'FAIL'}"
            f" (tol {args.logit_tol:g})")
        ok &= d.max().item() <= args.logit_tol

    if args.dsv3_golden and golden is not None:
        rc, lines = run_dsv3_golden(os.path.join(args.dsv3_build, "dsv3-golden"), args.hf_dir, golden_dir)
        log(f"dsv3-golden on the export's weights (rc {rc}):")
        for l in lines:
            log("  " + re.sub(r"\s{2,}", "  ", l))
        ok &= rc == 0

    # greedy tokens
    prompts = ([[int(x) for x in p.split(",")] for p in args.prompt_ids] if args.prompt_ids else
               ([golden["generate.prompt"][0].tolist()] if golden is not None else [[447, 99, 209, 421, 501]])
               + [LONG_PROMPT])
    gen = os.path.join(args.dsv3_build, "dsv3-generate")
    n = args.max_new_tokens
    for p in prompts:
        hf_tok, hf_steps = hf_greedy_nocache(model, p, n)
        hf_gen = hf_greedy_generate(model, p, n)
        try:
            ds_cache = dsv3_generate(gen, args.hf_dir, p, n, no_cache=False)
            ds_nocache = dsv3_generate(gen, args.hf_dir, p, n, no_cache=True)
        except (RuntimeError, OSError) as e:
            log(f"prompt ({len(p)} tokens): FAIL: {e}")
            ok = False
            continue
        top2 = torch.topk(hf_steps, 2, dim=-1).values
        margin = (top2[:, 0] - top2[:, 1]).min().item()
        log(f"prompt ({len(p)} tokens) {','.join(map(str, p))}")
        log(f"  transformers (no cache)  {hf_tok}")
        log(f"  transformers generate()  {hf_gen}")
        log(f"  dsv3-generate (cache)    {ds_cache}")
        log(f"  dsv3-generate --no-cache {ds_nocache}")
        agree = sum(a == b for a, b in zip(hf_tok, ds_cache))
        all_eq = hf_tok == hf_gen == ds_cache == ds_nocache
        log(f"  agreement transformers vs dsv3: {agree}/{n}; all four identical: {all_eq}; "
            f"smallest top1-top2 logit gap in transformers' steps {margin:.3e}")
        ok &= all_eq
        if golden is not None and p == golden["generate.prompt"][0].tolist() and n <= golden["generate.step_logits"].shape[0]:
            gt = golden["generate.greedy_tokens"][0, :n].tolist()
            sd = (hf_steps - golden["generate.step_logits"][:n]).abs().max().item()
            log(f"  vs golden: greedy tokens {'equal' if hf_tok == gt else 'DIFFER ' + str(gt)}, "
                f"transformers step logits vs golden generate.step_logits max abs diff {sd:.3e}")
            ok &= hf_tok == gt and sd <= args.logit_tol

    log("RESULT: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
