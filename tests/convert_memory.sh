#!/usr/bin/env bash
# The converters' memory bound on a sharded HF checkpoint several times larger than the cap, serial and under MPI.
#   tests/convert_memory.sh BUILD_DIR SOURCE_DIR
# 1. makes a synthetic DeepSeek-V3 HF checkpoint (hidden 512, 8 layers + 1 MTP, 32 experts; BF16 with the routers'
#    biases F32, the MTP's embed/head copies; ~330 MB in ~9 shards) with a pure-Python generator, and its FP8 twin
#    (the released format: F8_E4M3 + scale_inv for the weights ParamSpec::fp8 marks)
# 2. dsv3-hftoh5 --max-memory 64MB under /usr/bin/time -v: peak RSS <= cap + the fixed overhead (the peak RSS of the
#    same tool converting the 1.5 MB golden tiny model: MPI, HDF5, the libraries) + 16 MB slack
# 3. h5ls -r and h5py read every dataset; their sizes add up to the parameter count the tool reports
# 4. dsv3-h5tohf --max-memory 64MB back to BF16: same bound; every tensor byte-identical to the input (BF16 -> FP32
#    -> BF16 is exact), the index names the same tensors
# 5. the same under mpirun -np 2 (per-rank peak RSS), outputs byte-identical to the serial ones
# 6. the FP8 twin through hftoh5 within the cap; its values equal the BF16 twin's dequantized ones (checked by h5py)
set -euo pipefail
BIN=$(cd "$1" && pwd)
SRC=$(cd "$2" && pwd)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
CAP_MB=64
SLACK_MB=16
W=$(mktemp -d /tmp/dsv3_convert_memory_XXXXXX)
trap 'rm -rf "$W"' EXIT
PY=python3
for p in /usr/bin/python3 python3; do
  if command -v $p >/dev/null && $p -c 'import h5py, numpy' 2>/dev/null; then PY=$p; break; fi
done
if [ ! -x /usr/bin/time ]; then
  (apt-get install -y -qq time >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq time)) >/dev/null 2>&1 || true
fi
[ -x /usr/bin/time ] || { echo "convert_memory: /usr/bin/time (Debian package 'time') is missing"; exit 1; }

# ---- 1. the synthetic checkpoint ----------------------------------------------------------------------------------
cat > "$W/gen.py" <<'EOF'
# Writes a sharded HF DeepSeek-V3 checkpoint of random weights (deterministic per tensor name) without numpy.
import json, os, random, struct, sys, zlib
out, fp8, shard_bytes = sys.argv[1], sys.argv[2] == "fp8", int(sys.argv[3])
cfg = dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=8192, hidden_size=512,
           intermediate_size=1536, moe_intermediate_size=384, num_hidden_layers=8, first_k_dense_replace=1,
           moe_layer_freq=1, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=256, kv_lora_rank=128,
           qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=32, n_shared_experts=1,
           num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
           scoring_func="sigmoid", topk_method="noaux_tc", rms_norm_eps=1e-6, rope_theta=10000.0,
           max_position_embeddings=4096, num_nextn_predict_layers=1, tie_word_embeddings=False,
           rope_interleave=True, bos_token_id=0, eos_token_id=1, torch_dtype="bfloat16",
           rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=1024, beta_fast=32,
                             beta_slow=1, mscale=1.0, mscale_all_dim=1.0))
B = 128
if fp8:
    cfg["quantization_config"] = dict(activation_scheme="dynamic", fmt="e4m3", quant_method="fp8",
                                      weight_block_size=[B, B])
c = cfg
D, H, L = c["hidden_size"], c["num_attention_heads"], c["num_hidden_layers"]
qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
T = []  # (name, shape, kind) kind: w (quantizable weight), f (bf16), b (f32 bias); src = name of the data
def layer(i):
    p = f"model.layers.{i}."
    T.append((p + "input_layernorm.weight", [D], "f"))
    a = p + "self_attn."
    T.append((a + "q_a_proj.weight", [c["q_lora_rank"], D], "w"))
    T.append((a + "q_a_layernorm.weight", [c["q_lora_rank"]], "f"))
    T.append((a + "q_b_proj.weight", [H * qk, c["q_lora_rank"]], "w"))
    T.append((a + "kv_a_proj_with_mqa.weight", [c["kv_lora_rank"] + c["qk_rope_head_dim"], D], "w"))
    T.append((a + "kv_a_layernorm.weight", [c["kv_lora_rank"]], "f"))
    T.append((a + "kv_b_proj.weight", [H * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"]], "w"))
    T.append((a + "o_proj.weight", [D, H * c["v_head_dim"]], "w"))
    T.append((p + "post_attention_layernorm.weight", [D], "f"))
    m = p + "mlp."
    if i < c["first_k_dense_replace"]:
        I = c["intermediate_size"]
        T.extend([(m + "gate_proj.weight", [I, D], "w"), (m + "up_proj.weight", [I, D], "w"),
                  (m + "down_proj.weight", [D, I], "w")])
        return
    E, I = c["n_routed_experts"], c["moe_intermediate_size"]
    T.append((m + "gate.weight", [E, D], "f"))
    T.append((m + "gate.e_score_correction_bias", [E], "b"))
    for e in range(E):
        T.extend([(m + f"experts.{e}.gate_proj.weight", [I, D], "w"), (m + f"experts.{e}.up_proj.weight", [I, D], "w"),
                  (m + f"experts.{e}.down_proj.weight", [D, I], "w")])
    Is = I * c["n_shared_experts"]
    T.extend([(m + "shared_experts.gate_proj.weight", [Is, D], "w"), (m + "shared_experts.up_proj.weight", [Is, D], "w"),
              (m + "shared_experts.down_proj.weight", [D, Is], "w")])
T.append(("model.embed_tokens.weight", [c["vocab_size"], D], "f"))
for i in range(L): layer(i)
T.append(("model.norm.weight", [D], "f"))
T.append(("lm_head.weight", [c["vocab_size"], D], "f"))
p = f"model.layers.{L}."
T.extend([(p + "enorm.weight", [D], "f"), (p + "hnorm.weight", [D], "f"), (p + "eh_proj.weight", [D, 2 * D], "f")])
layer(L)
T.extend([(p + "shared_head.norm.weight", [D], "f"), (p + "embed_tokens.weight", [c["vocab_size"], D], "f:model.embed_tokens.weight"),
          (p + "shared_head.head.weight", [c["vocab_size"], D], "f:lm_head.weight")])

BF = bytes((b & 0x80) | (0x3C + (b & 3)) for b in range(256))        # bf16 high byte: finite, |x| in [2^-7, 2)
F8 = bytes(b ^ 1 if (b & 0x7F) == 0x7F else b for b in range(256))  # e4m3 codes without NaN
def numel(s):
    n = 1
    for d in s: n *= d
    return n
def entries(name, shape, kind):
    src = kind.split(":", 1)[1] if ":" in kind else name
    k = kind[0]
    if k == "w" and fp8:
        sb = [(shape[0] + B - 1) // B, (shape[1] + B - 1) // B]
        return [(name, "F8_E4M3", shape, src, "codes"), (name + "_scale_inv", "F32", sb, src, "scale")]
    return [(name, "F32" if k == "b" else "BF16", shape, src, "f32" if k == "b" else "bf16")]
def data(dtype, shape, src, what):
    n = numel(shape)
    r = random.Random(zlib.crc32((src + what).encode()))
    if what == "bf16":
        b = bytearray(r.randbytes(2 * n)); b[1::2] = bytes(b[1::2]).translate(BF); return bytes(b)
    if what == "codes":
        return r.randbytes(n).translate(F8)
    if what == "scale":
        return struct.pack(f"<{n}f", *[(1 + (i % 7)) / 4096.0 for i in range(n)])
    return struct.pack(f"<{n}f", *[(r.random() - 0.5) * 0.1 for _ in range(n)])
ents = [e for t in T for e in entries(*t)]
def size(e): return numel(e[2]) * {"BF16": 2, "F32": 4, "F8_E4M3": 1}[e[1]]
shards, cur, cb = [], [], 0
for e in ents:
    if cur and cb + size(e) > shard_bytes: shards.append(cur); cur, cb = [], 0
    cur.append(e); cb += size(e)
shards.append(cur)
os.makedirs(out, exist_ok=True)
wm, total = {}, 0
for k, sh in enumerate(shards):
    fn = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    hdr, off = {"__metadata__": {"format": "pt"}}, 0
    for e in sh:
        hdr[e[0]] = {"dtype": e[1], "shape": e[2], "data_offsets": [off, off + size(e)]}; off += size(e)
        wm[e[0]] = fn
    total += off
    h = json.dumps(hdr, separators=(",", ":")).encode()
    h += b" " * ((8 - (8 + len(h)) % 8) % 8)
    with open(os.path.join(out, fn), "wb") as f:
        f.write(struct.pack("<Q", len(h))); f.write(h)
        for e in sh: f.write(data(e[1], e[2], e[3], e[4]))
with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": wm}, f, indent=2)
with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)
print(f"{out}: {len(ents)} tensors, {total / 1e6:.1f} MB in {len(shards)} shards")
EOF
cat > "$W/cmp.py" <<'EOF'
# cmp.py A B: the two HF directories hold the same tensor names with byte-identical data
import hashlib, json, os, struct, sys
def tensors(d):
    wm = json.load(open(os.path.join(d, "model.safetensors.index.json")))["weight_map"]
    out = {}
    for fn in sorted(set(wm.values())):
        with open(os.path.join(d, fn), "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]; h = json.loads(f.read(n)); base = 8 + n
            for k, v in h.items():
                if k == "__metadata__": continue
                f.seek(base + v["data_offsets"][0])
                out[k] = (v["dtype"], v["shape"], hashlib.sha256(f.read(v["data_offsets"][1] - v["data_offsets"][0])).hexdigest())
    assert set(out) == set(wm), "index and shards disagree"
    return out
a, b = tensors(sys.argv[1]), tensors(sys.argv[2])
assert set(a) == set(b), f"names differ: {sorted(set(a) ^ set(b))[:5]}"
bad = [k for k in a if a[k] != b[k]]
assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"
print(f"{len(a)} tensors identical")
EOF

fail=0
check() {  # check NAME CONDITION_TEXT RESULT(0/1)
  if [ "$3" = 0 ]; then echo "PASS $1: $2"; else echo "FAIL $1: $2"; fail=1; fi
}
rss_mb() { awk '/Maximum resident set size/ {printf "%d", $6 / 1024}' "$1"; }

$PY "$W/gen.py" "$W/hf" bf16 40000000
$PY "$W/gen.py" "$W/hf8" fp8 40000000
in_mb=$(du -sm "$W/hf" | cut -f1)

# the fixed overhead: the same tool on the golden tiny model (1.5 MB)
/usr/bin/time -v -o "$W/t_tiny" "$BIN/dsv3-hftoh5" "$SRC/tests/golden/tiny" "$W/ck_tiny" --no-progress 2>/dev/null
/usr/bin/time -v -o "$W/t_tiny2" "$BIN/dsv3-h5tohf" "$W/ck_tiny" "$W/hf_tiny" --no-progress 2>/dev/null
base=$(rss_mb "$W/t_tiny"); base2=$(rss_mb "$W/t_tiny2")
limit=$((CAP_MB + base + SLACK_MB)); limit2=$((CAP_MB + base2 + SLACK_MB))
echo "fixed overhead (peak RSS converting tiny): hftoh5 $base MB, h5tohf $base2 MB; cap $CAP_MB MB; input $in_mb MB"

# ---- 2. hftoh5 within the cap -------------------------------------------------------------------------------------
t0=$(date +%s.%N)
/usr/bin/time -v -o "$W/t1" "$BIN/dsv3-hftoh5" "$W/hf" "$W/ck1" --max-memory ${CAP_MB}MB 2> "$W/log1" || { cat "$W/log1"; exit 1; }
t1=$(date +%s.%N)
tail -1 "$W/log1"
ck_mb=$(du -sm "$W/ck1/iter_0000000.h5" | cut -f1)
r=$(rss_mb "$W/t1")
check hftoh5_rss "peak RSS $r MB <= cap $CAP_MB + overhead $base + slack $SLACK_MB = $limit MB (input $in_mb MB, output $ck_mb MB, $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s)" $([ "$r" -le "$limit" ] && echo 0 || echo 1)
params=$(sed -n 's/.* HF tensors, \([0-9]*\) parameters.*/\1/p' "$W/log1")

# ---- 3. h5ls -r and h5py ------------------------------------------------------------------------------------------
h5sum=$(h5ls -r "$W/ck1/iter_0000000.h5" | awk '/Dataset \{/ { s = $0; sub(/.*\{/, "", s); sub(/\}.*/, "", s); n = split(s, d, ", "); p = 1; for (i = 1; i <= n; ++i) p *= d[i]; t += p } END { printf "%d", t }')
check h5ls "h5ls -r datasets add up to $h5sum = the parameter count $params" $([ "$h5sum" = "$params" ] && echo 0 || echo 1)
if $PY -c 'import h5py' 2>/dev/null; then
  pysum=$($PY - "$W/ck1/iter_0000000.h5" <<'EOF'
import h5py, sys
tot = 0
def visit(name, obj):
    global tot
    if isinstance(obj, h5py.Dataset):
        a = obj[...]  # every dataset is read
        assert a.dtype.name == "float32" and "checksum" in obj.attrs, name
        tot += a.size
with h5py.File(sys.argv[1], "r") as f:
    f.visititems(visit)
    assert f.attrs["iteration"] == 0 and b"hidden_size" in bytes(f.attrs["hf_config"])
print(tot)
EOF
)
  check h5py "h5py reads every dataset, sizes add up to $pysum = $params" $([ "$pysum" = "$params" ] && echo 0 || echo 1)
else
  echo "SKIP h5py: not installed (Debian: python3-h5py)"
fi

# ---- 4. h5tohf back within the cap, byte-identical ----------------------------------------------------------------
t0=$(date +%s.%N)
/usr/bin/time -v -o "$W/t2" "$BIN/dsv3-h5tohf" "$W/ck1" "$W/out1" --max-memory ${CAP_MB}MB --shard-size 40MB 2> "$W/log2" || { cat "$W/log2"; exit 1; }
t1=$(date +%s.%N)
tail -1 "$W/log2"
r=$(rss_mb "$W/t2")
check h5tohf_rss "peak RSS $r MB <= cap $CAP_MB + overhead $base2 + slack $SLACK_MB = $limit2 MB ($(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s)" $([ "$r" -le "$limit2" ] && echo 0 || echo 1)
m=$($PY "$W/cmp.py" "$W/hf" "$W/out1" 2>&1) && rc=0 || rc=1
check roundtrip "HF -> HDF5 -> HF (bf16): $m" $rc

# ---- 4b. a cap smaller than the largest tensors (embed/head: 25 MB as BF16 + FP32): they go in row pieces -----------
SMALL_MB=8
/usr/bin/time -v -o "$W/t6" "$BIN/dsv3-hftoh5" "$W/hf" "$W/ck6" --max-memory ${SMALL_MB}MB --no-progress 2> "$W/log6" || { cat "$W/log6"; exit 1; }
/usr/bin/time -v -o "$W/t7" "$BIN/dsv3-h5tohf" "$W/ck6" "$W/out6" --max-memory ${SMALL_MB}MB --shard-size 40MB --no-progress 2> "$W/log7" || { cat "$W/log7"; exit 1; }
tail -1 "$W/log6"; tail -1 "$W/log7"
r=$(rss_mb "$W/t6"); r2=$(rss_mb "$W/t7")
check small_cap_rss "--max-memory ${SMALL_MB}MB: peak RSS hftoh5 $r MB <= $((SMALL_MB + base + SLACK_MB)), h5tohf $r2 MB <= $((SMALL_MB + base2 + SLACK_MB))" $([ "$r" -le $((SMALL_MB + base + SLACK_MB)) ] && [ "$r2" -le $((SMALL_MB + base2 + SLACK_MB)) ] && echo 0 || echo 1)
m=$($PY "$W/cmp.py" "$W/hf" "$W/out6" 2>&1) && rc=0 || rc=1
check small_cap_roundtrip "in pieces: $m" $rc

# ---- 5. under mpirun -np 2 ----------------------------------------------------------------------------------------
MPI="mpirun -np 2 --oversubscribe"
$MPI sh -c "/usr/bin/time -v -o $W/t3.\$OMPI_COMM_WORLD_RANK $BIN/dsv3-hftoh5 $W/hf $W/ck2 --max-memory ${CAP_MB}MB" 2> "$W/log3" || { cat "$W/log3"; exit 1; }
tail -1 "$W/log3"
r0=$(rss_mb "$W/t3.0"); r1=$(rss_mb "$W/t3.1")
check mpi_hftoh5_rss "np 2: peak RSS per rank $r0 / $r1 MB <= $limit MB" $([ "$r0" -le "$limit" ] && [ "$r1" -le "$limit" ] && echo 0 || echo 1)
$MPI sh -c "/usr/bin/time -v -o $W/t4.\$OMPI_COMM_WORLD_RANK $BIN/dsv3-h5tohf $W/ck2 $W/out2 --max-memory ${CAP_MB}MB --shard-size 40MB" 2> "$W/log4" || { cat "$W/log4"; exit 1; }
tail -1 "$W/log4"
r0=$(rss_mb "$W/t4.0"); r1=$(rss_mb "$W/t4.1")
check mpi_h5tohf_rss "np 2: peak RSS per rank $r0 / $r1 MB <= $limit2 MB" $([ "$r0" -le "$limit2" ] && [ "$r1" -le "$limit2" ] && echo 0 || echo 1)
same=0
for f in "$W"/out1/*; do cmp -s "$f" "$W/out2/$(basename "$f")" || same=1; done
[ "$(ls "$W/out1" | wc -l)" = "$(ls "$W/out2" | wc -l)" ] || same=1
check mpi_identical "np 2 (hftoh5 and h5tohf) writes the same $(ls "$W/out1" | wc -l) files, byte for byte, as np 1" $same

# ---- 6. the FP8 twin ------------------------------------------------------------------------------------------------
/usr/bin/time -v -o "$W/t5" "$BIN/dsv3-hftoh5" "$W/hf8" "$W/ck8" --max-memory ${CAP_MB}MB --no-progress 2> "$W/log5" || { cat "$W/log5"; exit 1; }
tail -1 "$W/log5"
r=$(rss_mb "$W/t5")
check fp8_hftoh5_rss "FP8 input ($(du -sm "$W/hf8" | cut -f1) MB): peak RSS $r MB <= $limit MB" $([ "$r" -le "$limit" ] && echo 0 || echo 1)
if $PY -c 'import h5py, numpy' 2>/dev/null; then
  m=$($PY - "$W/hf8" "$W/ck8/iter_0000000.h5" <<'EOF' 2>&1
# the dequantized values of a few FP8 tensors, computed here from the codes and scales (numpy), equal the file's
import h5py, json, numpy as np, os, struct, sys
d = sys.argv[1]
wm = json.load(open(os.path.join(d, "model.safetensors.index.json")))["weight_map"]
def load(name):
    with open(os.path.join(d, wm[name]), "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]; h = json.loads(f.read(n)); v = h[name]
        f.seek(8 + n + v["data_offsets"][0]); b = f.read(v["data_offsets"][1] - v["data_offsets"][0])
    return v, b
def e4m3(c):
    c = c.astype(np.int32); s = np.where(c & 0x80, -1.0, 1.0); e = (c >> 3) & 15; m = c & 7
    return (s * np.where(e == 0, m / 8.0 * 2.0 ** -6, (1 + m / 8.0) * 2.0 ** (e - 7.0))).astype(np.float32)
B, n = 128, 0
with h5py.File(sys.argv[2], "r") as f:
    for hf, ds, e in [("model.layers.3.mlp.experts.17.down_proj.weight", "model.layers.3.mlp.experts.down_proj.weight", 17),
                      ("model.layers.8.self_attn.q_b_proj.weight", "model.layers.8.self_attn.q_b_proj.weight", None),
                      ("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight", None)]:
        v, b = load(hf); sv, sb = load(hf + "_scale_inv")
        codes = np.frombuffer(b, np.uint8).reshape(v["shape"]); sc = np.frombuffer(sb, np.float32).reshape(sv["shape"])
        ref = e4m3(codes) * np.repeat(np.repeat(sc, B, 0), B, 1)[: codes.shape[0], : codes.shape[1]]
        got = f["model/" + ds][...] if e is None else f["model/" + ds][e]
        assert np.array_equal(ref.view(np.uint32), got.view(np.uint32)), hf
        n += 1
print(f"{n} FP8 tensors import to the exact dequantized values")
EOF
) && rc=0 || rc=1
  check fp8_values "$m" $rc
fi

[ $fail = 0 ] && echo "convert_memory: all checks passed" || echo "convert_memory: FAILED"
exit $fail
