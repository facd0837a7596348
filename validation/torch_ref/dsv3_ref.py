"""Independent float32 PyTorch reference of DeepSeek-V3 (training + inference numerics).

Every convention follows tests/golden/tiny/README.md (read it first):
  * MLA with *interleaved* RoPE applied to the HF weights as stored (no permutation), YaRN,
  * sigmoid router, e_score_correction_bias for selection only, group-limited top-k,
    combine weights = unbiased scores normalised over the chosen experts x routed_scaling_factor,
  * MTP depth 1 = model.layers.{num_hidden_layers}: eh_proj(cat[enorm(emb(t_{i+1})) | hnorm(h_i)]) with
    h = the post-final-norm hidden, embed_tokens / shared_head.head tied to the main model's,
  * total = lm_loss + mtp_lambda*mtp_loss + aux_alpha*aux_loss (sequence-wise balance loss summed over
    all MoE layers incl. the MTP block),
  * training step: backward, global-norm clip, hand-written AdamW, aux-loss-free bias update,
  * FP8 e4m3fn 16x16 block quantization, greedy generation (full recompute).

Also contains a tiny numpy safetensors reader/writer. Only numpy + torch are needed (Debian python3-torch,
tested with torch 1.13). The code is dtype-generic so the same computation can be replayed in float64.

Shape names used in comments: B batch, S sequence, T = B*S tokens, D hidden, H heads, V vocab,
E routed experts, K experts per token, G expert groups, dn/dr/dv = qk_nope / qk_rope / v_head dims.
"""
import json
import math
import struct

import numpy as np
import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# safetensors (hand-written so that the file layout is fully under our control)
# ----------------------------------------------------------------------------------------------
_NP_OF = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32, "F8_E4M3": np.uint8}


def load_safetensors(path):
    """Returns (tensors, dtypes): name -> numpy array (F8_E4M3 as raw uint8 codes), name -> dtype string."""
    with open(path, "rb") as f:
        buf = f.read()
    (n,) = struct.unpack("<Q", buf[:8])
    header = json.loads(buf[8:8 + n].decode("utf-8"))
    base = 8 + n
    tensors, dtypes = {}, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        dt = np.dtype(_NP_OF[info["dtype"]]).newbyteorder("<")
        arr = np.frombuffer(buf, dtype=dt, count=(b - a) // dt.itemsize, offset=base + a)
        tensors[name] = arr.reshape(info["shape"]).astype(dt.newbyteorder("="), copy=True)
        dtypes[name] = info["dtype"]
    return tensors, dtypes


def save_safetensors(path, tensors, fp8_names=()):
    """Writes name -> numpy array. float32 -> F32, int64 -> I64, uint8 names listed in fp8_names -> F8_E4M3.

    Layout: 8-byte LE header length, compact JSON header ("__metadata__" first, then the tensors in sorted-name
    order) padded with spaces so the data starts 8-byte aligned, then raw LE data in sorted-name order.
    """
    fp8_names = set(fp8_names)
    header = {"__metadata__": {"format": "pt"}}
    blobs, off = [], 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype == np.float32:
            dt = "F32"
        elif arr.dtype == np.int64:
            dt = "I64"
        elif arr.dtype == np.uint8 and name in fp8_names:
            dt = "F8_E4M3"
        else:
            raise ValueError(f"{name}: unsupported dtype {arr.dtype}")
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * ((-(8 + len(hb))) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for d in blobs:
            f.write(d)


# ----------------------------------------------------------------------------------------------
# FP8 e4m3fn block quantization (numpy, bit-exact by construction)
# ----------------------------------------------------------------------------------------------
def e4m3fn_decode_table():
    """float32[256]: value of every e4m3fn code (bias 7, 3 mantissa bits, no inf, 0x7F/0xFF = NaN)."""
    t = np.zeros(256, dtype=np.float64)
    for c in range(256):
        s, e, m = c >> 7, (c >> 3) & 0xF, c & 7
        if e == 0xF and m == 7:
            v = np.nan
        elif e == 0:
            v = m / 8.0 * 2.0 ** -6  # subnormal, min 2^-9
        else:
            v = (1 + m / 8.0) * 2.0 ** (e - 7)
        t[c] = -v if s else v
    return t.astype(np.float32)


_E4M3 = e4m3fn_decode_table()
_E4M3_POS = _E4M3[:0x7F].astype(np.float64)  # codes 0x00..0x7E ascending, 0 .. 448


def e4m3fn_encode(x):
    """float32 array -> uint8 codes; round to nearest, ties to even mantissa, saturate at 448 (0x7E), sign kept.

    Consecutive codes are consecutive representable values, so 'even mantissa' == 'even code'. All values and
    midpoints are exact in float64, so the comparisons below are exact.
    """
    x = np.asarray(x, dtype=np.float32)
    a = np.abs(x).astype(np.float64).ravel()
    lo = np.clip(np.searchsorted(_E4M3_POS, a, side="right") - 1, 0, 0x7E)
    hi = np.minimum(lo + 1, 0x7E)
    dlo, dhi = a - _E4M3_POS[lo], _E4M3_POS[hi] - a
    up = (hi != lo) & ((dhi < dlo) | ((dhi == dlo) & (hi % 2 == 0)))
    code = np.where(up, hi, lo).astype(np.uint8)
    code = np.where(a >= 448.0, np.uint8(0x7E), code).astype(np.uint8)  # saturation
    code |= np.where(np.signbit(x.ravel()), np.uint8(0x80), np.uint8(0))
    return code.reshape(x.shape)


def fp8_block_quantize(w, block=(16, 16)):
    """w float32 [R,C] -> (codes uint8 [R,C], scale_inv float32 [ceil(R/br), ceil(C/bc)])."""
    w = np.asarray(w, dtype=np.float32)
    R, C = w.shape
    br, bc = block
    nr, nc = -(-R // br), -(-C // bc)
    scale = np.ones((nr, nc), dtype=np.float32)
    for i in range(nr):
        for j in range(nc):
            amax = np.float32(np.abs(w[i * br:(i + 1) * br, j * bc:(j + 1) * bc]).max())
            if amax > 0:
                scale[i, j] = amax / np.float32(448.0)  # float32 division
    full = np.repeat(np.repeat(scale, br, 0), bc, 1)[:R, :C]
    codes = e4m3fn_encode(w / full)  # float32 division
    return codes, scale


def fp8_block_dequantize(codes, scale_inv, block=(16, 16)):
    R, C = codes.shape
    full = np.repeat(np.repeat(scale_inv.astype(np.float32), block[0], 0), block[1], 1)[:R, :C]
    return _E4M3[codes] * full  # one float32 multiply


_QUANT_SUFFIXES = tuple(f"{n}.weight" for n in (
    "q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
    "gate_proj", "up_proj", "down_proj"))


def is_fp8_quantized(name, shape):
    """Every 2-D weight of self_attn and of the MLPs (dense, routed, shared); not embeddings, lm_head, norms,
    router gate (mlp.gate.weight), eh_proj, the MTP shared_head/embed copies."""
    return len(shape) == 2 and (".self_attn." in name or ".mlp." in name) and name.endswith(_QUANT_SUFFIXES)


def quantize_checkpoint(tensors, block=(16, 16)):
    """HF tensors -> (fp8 file dict, fp8 names, dequant dict of the quantized weights only)."""
    out, fp8_names, deq = {}, [], {}
    for name, arr in tensors.items():
        if is_fp8_quantized(name, arr.shape):
            codes, scale = fp8_block_quantize(arr, block)
            out[name], out[name + "_scale_inv"] = codes, scale
            fp8_names.append(name)
            deq[name] = fp8_block_dequantize(codes, scale, block)
        else:
            out[name] = arr
    return out, fp8_names, deq


# ----------------------------------------------------------------------------------------------
# Config and parameter table
# ----------------------------------------------------------------------------------------------
class Config:
    """The HF DeepseekV3 config fields the model needs."""

    def __init__(self, c):
        self.raw = c
        self.V, self.D = c["vocab_size"], c["hidden_size"]
        self.L = c["num_hidden_layers"]
        self.H = c["num_attention_heads"]
        self.q_lora = c.get("q_lora_rank") or 0  # null / 0 -> plain q_proj
        self.kv_lora = c["kv_lora_rank"]
        self.dn, self.dr, self.dv = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
        self.inter, self.moe_inter = c["intermediate_size"], c["moe_intermediate_size"]
        self.E = c.get("n_routed_experts") or 0
        self.K = c["num_experts_per_tok"]
        self.G, self.topk_group = c["n_group"], c["topk_group"]
        self.n_shared = c.get("n_shared_experts") or 0
        self.rsf = c["routed_scaling_factor"]
        self.first_dense = c["first_k_dense_replace"]
        self.moe_freq = c.get("moe_layer_freq", 1)
        self.eps = c["rms_norm_eps"]
        self.theta = c["rope_theta"]
        self.rope_scaling = c.get("rope_scaling")
        self.n_mtp = c.get("num_nextn_predict_layers", 0) or 0
        self.aux_alpha = c.get("aux_loss_alpha", 0.0)
        assert c.get("scoring_func", "sigmoid") == "sigmoid" and c.get("topk_method", "noaux_tc") == "noaux_tc"
        assert c.get("norm_topk_prob", True), "only norm_topk_prob=true is implemented"
        assert self.n_mtp in (0, 1), "only MTP depth 0/1 is implemented"
        assert self.dr % 2 == 0 and self.E % self.G == 0

    def is_moe(self, i):  # HF rule; the MTP layer (i = L) is MoE as well
        return self.E > 0 and i >= self.first_dense and i % self.moe_freq == 0


def hf_tensor_shapes(cfg):
    """Every tensor of an HF checkpoint (incl. MTP copies and e_score_correction_bias) -> shape, in a fixed order."""
    c, s = cfg, {}
    D, H = c.D, c.H
    s["model.embed_tokens.weight"] = (c.V, D)

    def mlp(p, inter):
        s[p + ".gate_proj.weight"] = (inter, D)
        s[p + ".up_proj.weight"] = (inter, D)
        s[p + ".down_proj.weight"] = (D, inter)

    def layer(i):
        p = f"model.layers.{i}"
        s[p + ".input_layernorm.weight"] = (D,)
        s[p + ".post_attention_layernorm.weight"] = (D,)
        a = p + ".self_attn"
        if c.q_lora:
            s[a + ".q_a_proj.weight"] = (c.q_lora, D)
            s[a + ".q_a_layernorm.weight"] = (c.q_lora,)
            s[a + ".q_b_proj.weight"] = (H * (c.dn + c.dr), c.q_lora)
        else:
            s[a + ".q_proj.weight"] = (H * (c.dn + c.dr), D)
        s[a + ".kv_a_proj_with_mqa.weight"] = (c.kv_lora + c.dr, D)
        s[a + ".kv_a_layernorm.weight"] = (c.kv_lora,)
        s[a + ".kv_b_proj.weight"] = (H * (c.dn + c.dv), c.kv_lora)
        s[a + ".o_proj.weight"] = (D, H * c.dv)
        if c.is_moe(i):
            s[p + ".mlp.gate.weight"] = (c.E, D)
            s[p + ".mlp.gate.e_score_correction_bias"] = (c.E,)
            for e in range(c.E):
                mlp(f"{p}.mlp.experts.{e}", c.moe_inter)
            if c.n_shared:
                mlp(p + ".mlp.shared_experts", c.moe_inter * c.n_shared)
        else:
            mlp(p + ".mlp", c.inter)

    for i in range(c.L):
        layer(i)
    s["model.norm.weight"] = (D,)
    s["lm_head.weight"] = (c.V, D)
    if c.n_mtp:
        p = f"model.layers.{c.L}"
        layer(c.L)
        s[p + ".enorm.weight"] = (D,)
        s[p + ".hnorm.weight"] = (D,)
        s[p + ".eh_proj.weight"] = (D, 2 * D)
        s[p + ".shared_head.norm.weight"] = (D,)
        s[p + ".shared_head.head.weight"] = (c.V, D)  # tied to lm_head
        s[p + ".embed_tokens.weight"] = (c.V, D)  # tied to model.embed_tokens
    return s


def tied_names(cfg):
    """MTP copy -> canonical (main-model) parameter name."""
    if not cfg.n_mtp:
        return {}
    p = f"model.layers.{cfg.L}"
    return {p + ".embed_tokens.weight": "model.embed_tokens.weight", p + ".shared_head.head.weight": "lm_head.weight"}


def golden_name(cfg, name):
    """Name under which a (canonical) parameter appears in golden.safetensors / train.json.

    The tiny golden set names the tied head by its MTP copy (grad./step3.model.layers.{L}.shared_head.head.weight,
    no lm_head.weight key) while the tied embedding keeps model.embed_tokens.weight; we follow it so that all
    golden directories share one convention."""
    if cfg.n_mtp and name == "lm_head.weight":
        return f"model.layers.{cfg.L}.shared_head.head.weight"
    return name


def is_norm(name):
    return name.endswith(("layernorm.weight", "norm.weight"))


def init_tensors(cfg, seed):
    """Deterministic test initialisation (README): RMSNorm 1+0.1*N(0,1), embeddings N(0,1), router gate
    N(0,(2.5/sqrt(D))^2), other linears N(0,1/fan_in), e_score_correction_bias N(0,0.05^2); MTP copies = main."""
    rng = np.random.default_rng(seed)
    tied = tied_names(cfg)
    out = {}
    for name, shape in hf_tensor_shapes(cfg).items():  # fixed order -> deterministic
        if name in tied:
            continue
        if name.endswith("e_score_correction_bias"):
            a = 0.05 * rng.standard_normal(shape)
        elif is_norm(name):
            a = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name == "model.embed_tokens.weight":
            a = rng.standard_normal(shape)
        elif name.endswith("mlp.gate.weight"):
            a = (2.5 / math.sqrt(cfg.D)) * rng.standard_normal(shape)
        else:
            a = rng.standard_normal(shape) / math.sqrt(shape[1])
        out[name] = a.astype(np.float32)
    for copy, canon in tied.items():
        out[copy] = out[canon].copy()
    return out


# ----------------------------------------------------------------------------------------------
# RoPE / YaRN
# ----------------------------------------------------------------------------------------------
def _yarn_mscale(scale, mscale):
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_params(cfg):
    """(inv_freq float64 [dr/2], softmax_scale, cos/sin attention factor)."""
    d = cfg.dr
    inv = 1.0 / (cfg.theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    scale = (cfg.dn + cfg.dr) ** -0.5
    att = 1.0
    rs = cfg.rope_scaling
    if rs:  # YaRN is always on when rope_scaling is present (HF behaviour)
        assert rs.get("type", rs.get("rope_type")) == "yarn"
        factor, orig = rs["factor"], rs["original_max_position_embeddings"]
        bf, bs = rs.get("beta_fast", 32), rs.get("beta_slow", 1)
        ms, msa = rs.get("mscale", 1.0), rs.get("mscale_all_dim", 0.0)

        def cd(r):  # correction dim: which rope dim completes r rotations over `orig` positions
            return d * math.log(orig / (2 * math.pi * r)) / (2 * math.log(cfg.theta))

        low, high = max(math.floor(cd(bf)), 0), min(math.ceil(cd(bs)), d - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(d // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        inv = inv / factor * ramp + inv * (1 - ramp)
        m = _yarn_mscale(factor, msa)
        scale = scale * m * m
        att = _yarn_mscale(factor, ms) / _yarn_mscale(factor, msa)
    return inv, scale, att


def rope_cos_sin(cfg, positions, dtype):
    """cos, sin [S, dr/2]; angles in float64, cast to the compute dtype."""
    inv, _, att = rope_params(cfg)
    ang = np.asarray(positions, dtype=np.float64)[:, None] * inv[None, :]
    return (torch.tensor(np.cos(ang) * att, dtype=dtype), torch.tensor(np.sin(ang) * att, dtype=dtype))


def apply_rope_interleaved(x, cos, sin):
    """x [..., S, h, dr]: pair (x_2i, x_2i+1) rotated by angle pos*inv_freq_i. cos/sin [S, dr/2]."""
    xp = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    x0, x1 = xp[..., 0], xp[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).reshape(x.shape)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def linear(x, w):  # HF Linear without bias: x @ W^T, W [out, in]
    return x @ w.t()


class DeepSeekV3:
    """Functional model over a dict of leaf tensors with canonical HF names.

    params: every trainable tensor (tied MTP copies omitted, they resolve to the canonical tensor);
    bias:   'model.layers.{i}.mlp' -> e_score_correction_bias (not trained by gradient).
    """

    def __init__(self, config, tensors, dtype=torch.float32):
        self.cfg = Config(config)
        self.dtype = dtype
        self.tied = tied_names(self.cfg)
        shapes = hf_tensor_shapes(self.cfg)
        missing = set(shapes) - set(tensors)
        extra = set(tensors) - set(shapes)
        assert not missing and not extra, f"missing {sorted(missing)[:5]} extra {sorted(extra)[:5]}"
        self.params, self.bias = {}, {}
        for name in shapes:
            a = np.asarray(tensors[name])
            assert tuple(a.shape) == tuple(shapes[name]), (name, a.shape, shapes[name])
            if name in self.tied:
                assert np.array_equal(a, np.asarray(tensors[self.tied[name]])), f"{name} must equal its tied tensor"
                continue
            t = torch.tensor(a, dtype=dtype)
            if name.endswith("e_score_correction_bias"):
                self.bias[name[: -len(".gate.e_score_correction_bias")]] = t
            else:
                self.params[name] = t.requires_grad_(True)

    def w(self, name):
        return self.params[self.tied.get(name, name)]

    def hf_tensors(self):
        """All HF tensors (incl. tied copies and biases) as numpy arrays of the model dtype."""
        out = {k: v.detach().numpy().copy() for k, v in self.params.items()}
        for p, b in self.bias.items():
            out[p + ".gate.e_score_correction_bias"] = b.numpy().copy()
        for copy, canon in self.tied.items():
            out[copy] = out[canon].copy()
        return out

    # --- blocks -------------------------------------------------------------------------------
    def attention(self, p, x, cos, sin):
        """MLA. x [B,S,D] -> [B,S,D]."""
        c = self.cfg
        B, S, _ = x.shape
        w = self.w
        if c.q_lora:
            q = linear(rms_norm(linear(x, w(p + ".q_a_proj.weight")), w(p + ".q_a_layernorm.weight"), c.eps),
                       w(p + ".q_b_proj.weight"))
        else:
            q = linear(x, w(p + ".q_proj.weight"))
        q = q.view(B, S, c.H, c.dn + c.dr)
        q_nope, q_pe = q[..., : c.dn], q[..., c.dn:]
        kv = linear(x, w(p + ".kv_a_proj_with_mqa.weight"))  # [B,S,kv_lora+dr]
        ckv, k_pe = kv[..., : c.kv_lora], kv[..., c.kv_lora:].unsqueeze(2)  # k_pe [B,S,1,dr] shared by heads
        q_pe = apply_rope_interleaved(q_pe, cos, sin)
        k_pe = apply_rope_interleaved(k_pe, cos, sin)
        kvb = linear(rms_norm(ckv, w(p + ".kv_a_layernorm.weight"), c.eps), w(p + ".kv_b_proj.weight"))
        kvb = kvb.view(B, S, c.H, c.dn + c.dv)
        k_nope, v = kvb[..., : c.dn], kvb[..., c.dn:]
        _, softmax_scale, _ = rope_params(c)
        scores = (torch.einsum("bshd,bthd->bhst", q_nope, k_nope)
                  + torch.einsum("bshd,btd->bhst", q_pe, k_pe[:, :, 0])) * softmax_scale  # [B,H,S,S]
        causal = torch.ones(S, S, dtype=torch.bool).triu(1)
        probs = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
        o = torch.einsum("bhst,bthd->bshd", probs, v).reshape(B, S, c.H * c.dv)
        return linear(o, w(p + ".o_proj.weight"))

    def mlp(self, p, x):  # SwiGLU
        w = self.w
        return linear(F.silu(linear(x, w(p + ".gate_proj.weight"))) * linear(x, w(p + ".up_proj.weight")),
                      w(p + ".down_proj.weight"))

    def route(self, p, xf, B):
        """Router of MoE layer p. xf [T,D] (T = B*S_l). Returns dict (see keys) incl. robustness gaps."""
        c = self.cfg
        T = xf.shape[0]
        s = torch.sigmoid(linear(xf, self.w(p + ".gate.weight")))  # [T,E] unbiased scores (differentiable)
        with torch.no_grad():
            def select(sc):  # group-limited top-k selection on scores sc [T,E]
                grp = sc.view(T, c.G, c.E // c.G).topk(2, dim=-1).values.sum(-1)  # [T,G]
                gsort = grp.sort(dim=-1, descending=True).values
                keep = torch.zeros_like(grp, dtype=torch.bool).scatter_(1, grp.topk(c.topk_group, -1).indices, True)
                masked = sc.masked_fill(~keep.repeat_interleave(c.E // c.G, dim=1), float("-inf"))
                msort = masked.sort(dim=-1, descending=True).values
                idx = masked.topk(c.K, dim=-1).indices.sort(dim=-1).values  # [T,K] ascending expert id
                return idx, gsort, msort

            sel = s.detach() + self.bias[p]
            idx, gsort, msort = select(sel)
            idx_nobias, _, _ = select(s.detach())
            info = {
                "min_group_gap": float((gsort[:, c.topk_group - 1] - gsort[:, c.topk_group]).min())
                if c.topk_group < c.G else float("inf"),
                "min_expert_gap": float((msort[:, c.K - 1] - msort[:, c.K]).min()),
                "kth_selected_biased_score_min": float(msort[:, c.K - 1].min()),
                "n_bias_changed": int((idx != idx_nobias).any(-1).sum()),
            }
            counts = torch.bincount(idx.flatten(), minlength=c.E)  # [E]
        wts = s.gather(1, idx)
        wts = wts / wts.sum(-1, keepdim=True) * c.rsf  # [T,K], normalised unbiased scores

        # sequence-wise balance loss (without alpha), averaged over the B sequences
        S_l = T // B
        with torch.no_grad():
            cnt_b = torch.zeros(B, c.E, dtype=s.dtype).scatter_add_(
                1, idx.view(B, S_l * c.K), torch.ones(B, S_l * c.K, dtype=s.dtype))
            f = cnt_b * (c.E / (c.K * S_l))  # [B,E]
            # informational: Megatron-style plain top-k of the unbiased scores
            lit = s.detach().topk(c.K + 1, dim=-1).values
            idx_lit = s.detach().topk(c.K, dim=-1).indices
            f_lit = torch.zeros(B, c.E, dtype=s.dtype).scatter_add_(
                1, idx_lit.reshape(B, S_l * c.K), torch.ones(B, S_l * c.K, dtype=s.dtype)) * (c.E / (c.K * S_l))
        P = (s / s.sum(-1, keepdim=True)).view(B, S_l, c.E).mean(1)  # [B,E]
        aux = (f * P).sum(-1).mean()
        info["aux_literal_eq18"] = float((f_lit * P.detach()).sum(-1).mean())
        info["min_gap_literal_eq18"] = float((lit[:, c.K - 1] - lit[:, c.K]).min())
        info.update(idx=idx, weight=wts, counts=counts, aux=aux)
        return info

    def moe(self, p, x):
        """x [B,S,D] -> ([B,S,D], routing info)."""
        c = self.cfg
        B, S, D = x.shape
        xf = x.reshape(B * S, D)
        r = self.route(p, xf, B)
        idx, wts = r["idx"], r["weight"]
        out = torch.zeros_like(xf)
        for e in range(c.E):
            tok, slot = torch.nonzero(idx == e, as_tuple=True)
            if tok.numel() == 0:
                continue  # unused expert: its parameters get an exact zero gradient
            y = self.mlp(f"{p}.experts.{e}", xf[tok]) * wts[tok, slot].unsqueeze(-1)
            out = out.index_add(0, tok, y)
        if c.n_shared:
            out = out + self.mlp(p + ".shared_experts", xf)
        return out.view(B, S, D), r

    def decoder_layer(self, i, x, cos, sin, routing):
        c, p = self.cfg, f"model.layers.{i}"
        x = x + self.attention(p + ".self_attn", rms_norm(x, self.w(p + ".input_layernorm.weight"), c.eps), cos, sin)
        h = rms_norm(x, self.w(p + ".post_attention_layernorm.weight"), c.eps)
        if c.is_moe(i):
            y, r = self.moe(p + ".mlp", h)
            routing[p + ".mlp"] = r
        else:
            y = self.mlp(p + ".mlp", h)
        return x + y

    # --- full forward -------------------------------------------------------------------------
    def forward(self, ids, mtp=True, mtp_lambda=0.3, aux_alpha=None):
        """ids int64 [B,S]. Returns dict: hidden (name -> tensor), logits [B,S,V], mtp_logits [B,S-1,V],
        lm_loss, mtp_loss, aux_loss, total_loss (0-d tensors), routing (layer -> info)."""
        c = self.cfg
        if aux_alpha is None:
            aux_alpha = c.aux_alpha
        ids = torch.as_tensor(ids, dtype=torch.int64)
        B, S = ids.shape
        hid, routing = {}, {}
        x = self.w("model.embed_tokens.weight")[ids]
        hid["embed"] = x
        cos, sin = rope_cos_sin(c, np.arange(S), self.dtype)
        for i in range(c.L):
            x = self.decoder_layer(i, x, cos, sin, routing)
            hid[f"layer{i}"] = x
        h = rms_norm(x, self.w("model.norm.weight"), c.eps)  # [B,S,D], fed to lm_head and the MTP block
        hid["final_norm"] = h
        logits = linear(h, self.w("lm_head.weight"))
        out = {"hidden": hid, "logits": logits, "routing": routing}
        if S > 1:
            out["lm_loss"] = F.cross_entropy(logits[:, :-1].reshape(-1, c.V), ids[:, 1:].reshape(-1))
        if mtp and c.n_mtp:
            L, p = c.L, f"model.layers.{c.L}"
            e = self.w(p + ".embed_tokens.weight")[ids[:, 1:]]  # emb(t_{i+1}) [B,S-1,D]
            cat = torch.cat([rms_norm(e, self.w(p + ".enorm.weight"), c.eps),  # embedding first
                             rms_norm(h[:, :-1], self.w(p + ".hnorm.weight"), c.eps)], dim=-1)
            m = linear(cat, self.w(p + ".eh_proj.weight"))
            hid["mtp_eh_proj"] = m
            cos1, sin1 = rope_cos_sin(c, np.arange(S - 1), self.dtype)
            m = self.decoder_layer(L, m, cos1, sin1, routing)
            hid["mtp_block"] = m
            mlog = linear(rms_norm(m, self.w(p + ".shared_head.norm.weight"), c.eps),
                          self.w(p + ".shared_head.head.weight"))
            out["mtp_logits"] = mlog
            if S > 2:
                out["mtp_loss"] = F.cross_entropy(mlog[:, :-1].reshape(-1, c.V), ids[:, 2:].reshape(-1))
        if routing:
            out["aux_loss"] = sum(r["aux"] for r in routing.values())
        if "lm_loss" in out and "mtp_loss" in out:
            total = out["lm_loss"] + mtp_lambda * out["mtp_loss"]
            if "aux_loss" in out:
                total = total + aux_alpha * out["aux_loss"]
            out["total_loss"] = total
        return out


def min_gaps(routing):
    """Minimum expert / group gap and k-th selected biased score over all MoE layers of one forward."""
    if not routing:
        return {"min_expert_gap": float("inf"), "min_group_gap": float("inf"), "kth_selected_biased_score_min": float("inf")}
    return {k: min(r[k] for r in routing.values())
            for k in ("min_expert_gap", "min_group_gap", "kth_selected_biased_score_min")}


# ----------------------------------------------------------------------------------------------
# Training (clip + hand-written AdamW + aux-loss-free bias update)
# ----------------------------------------------------------------------------------------------
DEFAULT_HP = dict(lr=0.01, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, max_norm=1.0, clip_eps=1e-6,
                  mtp_lambda=0.3, aux_alpha=None, gamma=0.001)


def uses_weight_decay(name, t):
    return t.dim() >= 2  # every linear / router / eh_proj / embedding / lm_head; not the 1-D RMSNorm weights


class Trainer:
    def __init__(self, model, hp=None):
        self.m = model
        self.hp = dict(DEFAULT_HP, **(hp or {}))
        if self.hp["aux_alpha"] is None:
            self.hp["aux_alpha"] = model.cfg.aux_alpha
        self.t = 0
        self.state = {k: (torch.zeros_like(v.detach()), torch.zeros_like(v.detach())) for k, v in model.params.items()}

    def step(self, ids):
        """One training step on ids [B,S]; returns a record (losses, grad norm, clip coef, loads, routing, raw grads)."""
        m, hp = self.m, self.hp
        for p in m.params.values():
            p.grad = None
        out = m.forward(ids, mtp=True, mtp_lambda=hp["mtp_lambda"], aux_alpha=hp["aux_alpha"])
        out["total_loss"].backward()
        grads = {}
        for k, p in m.params.items():
            # a parameter that took no part in the graph (e.g. an expert no token was routed to) has grad 0
            grads[k] = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p.detach())
        raw = {k: g.clone() for k, g in grads.items()}
        norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))  # tied counted once
        coef = hp["max_norm"] / (norm + hp["clip_eps"])
        if coef < 1:
            for g in grads.values():
                g.mul_(coef)
        # AdamW, decoupled weight decay, bias-corrected moments; every element is updated
        self.t += 1
        t, b1, b2, lr, eps = self.t, hp["beta1"], hp["beta2"], hp["lr"], hp["eps"]
        with torch.no_grad():
            for k, p in m.params.items():
                g = grads[k]
                mm, vv = self.state[k]
                mm.mul_(b1).add_((1 - b1) * g)
                vv.mul_(b2).add_((1 - b2) * g * g)
                if uses_weight_decay(k, p):
                    p.mul_(1 - lr * hp["weight_decay"])
                p.sub_(lr * (mm / (1 - b1 ** t)) / (torch.sqrt(vv / (1 - b2 ** t)) + eps))
            # aux-loss-free bias update, every MoE layer incl. MTP: b_i += gamma*sign(mean_j load_j - load_i)
            loads = {}
            for lp, r in out["routing"].items():
                load = r["counts"].to(torch.float64)
                m.bias[lp] += (hp["gamma"] * torch.sign(load.mean() - load)).to(m.dtype)
                loads[lp] = r["counts"].clone()
        return {"out": out, "grads": raw, "grad_norm": norm, "clip_coef": coef, "loads": loads}


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def greedy_generate(model, prompt, n_new):
    """prompt int64 [1,P]; full recompute each step. Returns (tokens [1,n_new], step_logits [n_new,V], min gaps)."""
    ids = torch.as_tensor(prompt, dtype=torch.int64)
    toks, logs = [], []
    gaps = {"min_expert_gap": float("inf"), "min_group_gap": float("inf"), "min_top1_top2_logit_gap": float("inf"),
            "kth_selected_biased_score_min": float("inf")}
    for _ in range(n_new):
        out = model.forward(ids, mtp=False)
        last = out["logits"][0, -1]
        top2 = last.topk(2).values
        for k, v in min_gaps(out["routing"]).items():
            gaps[k] = min(gaps[k], v)
        gaps["min_top1_top2_logit_gap"] = min(gaps["min_top1_top2_logit_gap"], float(top2[0] - top2[1]))
        nxt = int(last.argmax())
        toks.append(nxt)
        logs.append(last.clone())
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return torch.tensor([toks], dtype=torch.int64), torch.stack(logs), gaps


# ----------------------------------------------------------------------------------------------
# Every golden.safetensors key of one case (shared by check_tiny.py and make_golden.py)
# ----------------------------------------------------------------------------------------------
def _np(t):
    """Tensor -> numpy; float32 stays float32, a float64 replay keeps float64 (for the f32-vs-f64 comparison)."""
    return t.detach().numpy().copy()


def _scalar(t):
    return np.array([float(t)], dtype=torch.empty(0, dtype=t.dtype).numpy().dtype)


def compute_golden(config, tensors, choose_batch, choose_prompt, choose_fp8_input, hp=None, n_steps=3, n_gen=16,
                   dtype=torch.float32, fp8_block=(16, 16)):
    """Runs the whole case and returns (golden: key -> numpy array, info: dict for train.json / report.json).

    choose_batch(step, model) -> (ids [B,S] int64 numpy, meta dict): called with the model holding the
        parameters of that step (so a generator can redraw until routing is robust); step 0's batch is also
        the batch of the golden forward/backward.
    choose_prompt(model) / choose_fp8_input(fp8_model) -> (ids, meta) likewise for the initial / FP8 model.
    """
    g, info = {}, {"steps": []}
    model = DeepSeekV3(config, tensors, dtype)
    cfg = model.cfg

    # greedy generation from the initial model
    prompt, meta = choose_prompt(model)
    toks, logs, gaps = greedy_generate(model, prompt, n_gen)
    g["generate.prompt"], g["generate.greedy_tokens"], g["generate.step_logits"] = (
        np.asarray(prompt, dtype=np.int64), toks.numpy(), _np(logs))
    info["generate"] = dict(meta, **gaps)

    # FP8: quantized weights replaced by their dequantized values, everything else unchanged
    _, fp8_names, deq = quantize_checkpoint(tensors, fp8_block)
    fp8_model = DeepSeekV3(config, dict(tensors, **deq), dtype)
    fids, meta = choose_fp8_input(fp8_model)
    with torch.no_grad():
        fo = fp8_model.forward(fids, mtp=False)
    g["fp8_check.input_ids"], g["fp8_check.logits"] = np.asarray(fids, dtype=np.int64), _np(fo["logits"])
    rel = max(float(np.abs(deq[n] - tensors[n]).max() / max(np.abs(tensors[n]).max(), 1e-30)) for n in fp8_names)
    info["fp8"] = dict(meta, **min_gaps(fo["routing"]), n_quantized_tensors=len(fp8_names), max_rel_dequant_err=rel)
    del fp8_model

    # training (step 0 doubles as the golden forward/backward at the initial parameters)
    trainer = Trainer(model, hp)
    hp = trainer.hp
    hist = {k: [] for k in ("lm_loss", "mtp_loss", "aux_loss", "total_loss", "grad_norm")}
    loads = {}
    for step in range(n_steps):
        ids, meta = choose_batch(step, model)
        ids = np.asarray(ids, dtype=np.int64)
        g[f"input_ids_step{step}"] = ids
        rec = trainer.step(ids)
        out = rec["out"]
        if step == 0:
            g["input_ids"] = ids
            for k, v in out["hidden"].items():
                g[f"hidden.{k}"] = _np(v)
            g["logits"], g["mtp_logits"] = _np(out["logits"]), _np(out["mtp_logits"])
            for k in ("lm_loss", "mtp_loss", "aux_loss", "total_loss"):
                g[k] = _scalar(out[k])
            for lp, r in out["routing"].items():
                g[f"aux_loss.{lp}"] = _scalar(r["aux"])
                g[f"expert_counts.{lp}"] = r["counts"].numpy().astype(np.int64)
                g[f"routing.topk_idx.{lp}"] = r["idx"].numpy().astype(np.int64)
                g[f"routing.topk_weight.{lp}"] = _np(r["weight"])
            for k, v in rec["grads"].items():
                g[f"grad.{golden_name(cfg, k)}"] = _np(v)
            info["step0_aux_literal_eq18"] = sum(r["aux_literal_eq18"] for r in out["routing"].values())
            info["step0_min_gap_literal_eq18"] = min(r["min_gap_literal_eq18"] for r in out["routing"].values())
        for k in ("lm_loss", "mtp_loss", "aux_loss", "total_loss"):
            hist[k].append(float(out[k]))
        hist["grad_norm"].append(rec["grad_norm"])
        for lp, c in rec["loads"].items():
            loads.setdefault(lp, []).append(c.numpy().astype(np.int64))
        info["steps"].append(dict(
            step=step, **meta,
            lm_loss=float(out["lm_loss"]), mtp_loss=float(out["mtp_loss"]), aux_loss=float(out["aux_loss"]),
            total_loss=float(out["total_loss"]),
            aux_loss_per_layer={lp: float(r["aux"]) for lp, r in out["routing"].items()},
            grad_norm_before_clip=rec["grad_norm"], clip_coef=rec["clip_coef"],
            expert_load={lp: [int(x) for x in c] for lp, c in rec["loads"].items()},
            **min_gaps(out["routing"]),
            n_tokens_whose_selection_the_bias_changed={lp: r["n_bias_changed"] for lp, r in out["routing"].items()}))
    for k, v in hist.items():
        g[f"train.{k}"] = np.array(v, dtype=torch.empty(0, dtype=dtype).numpy().dtype)
    for lp, v in loads.items():
        g[f"train.expert_load.{lp}"] = np.stack(v)
    final = model.hf_tensors()
    for k in model.params:
        g[f"step3.{golden_name(cfg, k)}"] = final[k]
    for lp in model.bias:
        k = lp + ".gate.e_score_correction_bias"
        g[f"step3.{k}"] = final[k]
    info["hp"] = hp
    return g, info
