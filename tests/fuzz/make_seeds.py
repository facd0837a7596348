#!/usr/bin/env python3
"""Writes the seed corpora of the libFuzzer targets into tests/fuzz/corpus/<target>/ (deterministic; run from
anywhere: python3 tests/fuzz/make_seeds.py). Seeds are small valid inputs taken from the repository (decks,
config.json files, the shipped tokenizer cut down) or built here, plus slightly broken variants of each. The
input layouts (mode bytes, splits) are the ones documented at the top of each fuzz_<target>.cpp."""
import json
import os
import shutil
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(HERE, "corpus")


def out(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def read(rel, mode="rb"):
    with open(os.path.join(ROOT, rel), mode) as f:
        return f.read()


# ---- deck -------------------------------------------------------------------------------------------------
def decks():
    for rel in ["input/tiny.deck", "input/pretrain.deck", "input/bench-small.deck"]:
        out("deck", os.path.basename(rel), read(rel))
    cfg = json.loads(read("tests/golden/tiny/config.json"))
    model_keys = ["vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                  "first_k_dense_replace", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                  "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
                  "n_group", "topk_group", "max_position_embeddings", "num_nextn_predict_layers"]
    model = "[model]\n" + "".join(f"{k} = {cfg[k]}\n" for k in model_keys)
    model += "[model.rope_scaling]\ntype = yarn\nfactor = 4\noriginal_max_position_embeddings = 32\n"
    out("deck", "model-keys.deck", "[train]\niters = 3\nseq_length = 16\nglobal_batch = 2\n" + model)
    out("deck", "model-huge.deck", "[model]\nvocab_size = 9223372036854775807\nhidden_size = 4611686018427387904\n"
        "num_hidden_layers = 1000000000\n")
    out("deck", "quotes.deck", '[run]\nname = "a # b"  # comment\ndevice = cpu\n[train]\niters = 1\n')
    out("deck", "bad-section.deck", "[nosuch]\nx = 1\n")
    out("deck", "bad-line.deck", "[train]\niters\n")
    out("deck", "bad-quote.deck", '[run]\nname = "unterminated\n')
    out("deck", "bad-int.deck", "[train]\niters = 1e99\n")
    out("deck", "include-missing.deck", "include = does/not/exist.deck\n[train]\niters = 2\n")
    out("deck", "overrides", "#!overrides\ntrain.iters=5\nmodel.hidden_size=64\nrun.name=\"x y\"\noptim.lr=nan\n")
    out("deck", "overrides-bad", "#!overrides\nnokey\n.x=1\ntrain.iters=-1\n")
    # found by fuzz_deck: an unbalanced quote that resolved_text() could not write back
    out("deck", "overrides-quote", '#!overrides\ntrain.iters=5\nmodel.hidden_size=38\nrun.name="xbias_update_stop_tokens = ')

    def field(s):
        s = s.encode() if isinstance(s, str) else s
        return str(len(s)).encode() + b":" + s

    entries = [("train.iters", "7", "x.deck:3", ""), ("run.name", "n", "command line", "")]
    ser = b"dsv3-deck-v1" + field(str(len(entries)))
    for e in entries:
        ser += b"".join(field(x) for x in e)
    out("deck", "serialized", ser)
    out("deck", "serialized-bad", b"dsv3-deck-v1" + field("99999999999999999999999") + b"5:x")


# ---- safetensors ------------------------------------------------------------------------------------------
def st_header(tensors, metadata=None, pad=True):
    """tensors: [(name, dtype, shape, bytes)] -> (header json bytes, data bytes)"""
    h, data = {}, b""
    if metadata:
        h["__metadata__"] = metadata
    for name, dt, shape, b in tensors:
        h[name] = {"dtype": dt, "shape": shape, "data_offsets": [len(data), len(data) + len(b)]}
        data += b
    hj = json.dumps(h, separators=(",", ":")).encode()
    if pad:
        hj += b" " * ((8 - len(hj) % 8) % 8)
    return hj, data


def st_file(tensors, metadata=None):
    hj, data = st_header(tensors, metadata)
    return struct.pack("<Q", len(hj)) + hj + data


SMALL = [("a", "F32", [2, 3], struct.pack("<6f", 1, -2, 3.5, 0, 1e-3, 7)),
         ("b", "BF16", [4], struct.pack("<4H", 0x3F80, 0xC000, 0x7FC0, 1)),
         ("c", "I64", [2], struct.pack("<2q", 5, -1)),
         ("d", "I32", [3], struct.pack("<3i", 1, 2, -3)),
         ("e", "F16", [1, 2], struct.pack("<2H", 0x3C00, 0x7C00)),
         ("f", "F8_E4M3", [2, 2], bytes([0x38, 0xB8, 0x7E, 0x01])),
         ("z", "F32", [0, 5], b"")]


def safetensors():
    f = st_file(SMALL, {"format": "pt"})
    out("safetensors", "raw-small", b"\x00" + f)
    hj, data = st_header(SMALL, {"format": "pt"}, pad=False)
    out("safetensors", "split-small", b"\x01" + hj + b"\x00" + data)
    out("safetensors", "raw-empty", b"\x00" + struct.pack("<Q", 2) + b"{}")
    out("safetensors", "raw-hlen-max", b"\x00" + b"\xff" * 8 + b"{}")
    out("safetensors", "raw-hlen-2^63", b"\x00" + struct.pack("<Q", 1 << 63) + b"{}")
    out("safetensors", "raw-short", b"\x00\x05\x00")
    # broken headers in split form
    def split(h, data=b""):
        return b"\x01" + json.dumps(h, separators=(",", ":")).encode() + b"\x00" + data
    out("safetensors", "split-overflow-shape",
        split({"x": {"dtype": "F32", "shape": [4611686018427387904, 4], "data_offsets": [0, 0]}}))
    out("safetensors", "split-u64-shape",
        split({"x": {"dtype": "F32", "shape": [18446744073709551615], "data_offsets": [0, 4]}}, b"\0" * 4))
    out("safetensors", "split-offsets-overlap",
        split({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
               "y": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, b"\0" * 8))
    out("safetensors", "split-offsets-huge",
        split({"x": {"dtype": "I64", "shape": [1], "data_offsets": [18446744073709551608, 0]}}, b"\0" * 8))
    out("safetensors", "split-gap",
        split({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8))
    out("safetensors", "split-bad-dtype",
        split({"x": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8))
    out("safetensors", "split-metadata-nonstring",
        split({"__metadata__": {"k": 1}}))
    out("safetensors", "split-zero-dim-huge",
        split({"x": {"dtype": "F8_E4M3", "shape": [9223372036854775807, 0], "data_offsets": [0, 0]}}))


# ---- hf_index ---------------------------------------------------------------------------------------------
def hf_index():
    wm = {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
          "c": "model-00001-of-00002.safetensors", "w": "model-00002-of-00002.safetensors",
          "w_scale_inv": "model-00002-of-00002.safetensors", "x": "model-00002-of-00002.safetensors"}
    idx = json.dumps({"metadata": {"total_size": 1234}, "weight_map": wm}, indent=1).encode()
    out("hf_index", "valid", b"\x00" + idx)
    out("hf_index", "valid-index-path", b"\x40" + idx)
    out("hf_index", "valid-block-3x1", b"\x82" + idx)
    partial = json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}).encode()
    out("hf_index", "partial-map", b"\x00" + partial)
    out("hf_index", "missing-shard", b"\x00" + json.dumps({"weight_map": {"a": "nope.safetensors"}}).encode())
    out("hf_index", "wrong-shard", b"\x00" + json.dumps({"weight_map": {"a": "model-00002-of-00002.safetensors"}}).encode())
    out("hf_index", "no-weight-map", b"\x00" + b'{"metadata": {}}')
    out("hf_index", "not-json", b"\x00" + b'{"weight_map": {"a": ')
    # a fuzzed third shard: fp8 weight with its scale, bf16 and int tensors
    fz = [("q", "F8_E4M3", [3, 5], bytes(range(15))), ("q_scale_inv", "F32", [2, 3], struct.pack("<6f", 1, 2, 3, 4, 5, 6)),
          ("r", "BF16", [2], struct.pack("<2H", 0x4000, 0x8000))]
    hj, data = st_header(fz, pad=False)
    wm2 = dict(wm, q="fuzz.safetensors", q_scale_inv="fuzz.safetensors", r="fuzz.safetensors")
    out("hf_index", "fuzz-shard", b"\x00" + json.dumps({"weight_map": wm2}).encode() + b"\x00" + hj + b"\x00" + data)
    # the same tensor unmapped in two shards
    dup = [("a", "F32", [1], struct.pack("<f", 1))]
    hj, data = st_header(dup, pad=False)
    out("hf_index", "dup-unmapped", b"\x00" + json.dumps({"weight_map": {"b": "model-00001-of-00002.safetensors",
                                                                          "q": "fuzz.safetensors"}}).encode()
        + b"\x00" + hj + b"\x00" + data)
    # fp8 with a zero column count and a huge row count
    z = [("q", "F8_E4M3", [9223372036854775807, 0], b""), ("q_scale_inv", "F32", [72057594037927936, 0], b"")]
    hj, data = st_header(z, pad=False)
    out("hf_index", "fp8-zero-cols", b"\x00" + json.dumps({"weight_map": {"q": "fuzz.safetensors"}}).encode()
        + b"\x00" + hj + b"\x00" + data)


# ---- config -----------------------------------------------------------------------------------------------
def configs():
    for rel, name in [("tests/golden/tiny/config.json", "tiny.json"), ("tests/golden/alt/config.json", "alt.json"),
                      ("input/models/deepseek-v3.json", "deepseek-v3.json"), ("input/models/small.json", "small.json")]:
        out("config", name, read(rel))
    cfg = json.loads(read("tests/golden/tiny/config.json"))
    def v(name, **kw):
        c = dict(cfg)
        c.update(kw)
        out("config", name, json.dumps(c, indent=1))
    v("huge-vocab.json", vocab_size=9223372036854775807)
    v("huge-hidden.json", hidden_size=4294967296, intermediate_size=4294967296)
    v("u64.json", num_hidden_layers=18446744073709551615)
    v("float-int.json", num_hidden_layers=4.0, kv_lora_rank=1e30)
    v("many-layers.json", num_hidden_layers=1000000000000, first_k_dense_replace=1)
    v("negative.json", n_group=-4)
    v("null-q-lora.json", q_lora_rank=None, n_routed_experts=None)
    v("bad-block.json", quantization_config={"weight_block_size": [4294967312, 16]})
    out("config", "not-object.json", "[1, 2]")
    out("config", "truncated.json", json.dumps(cfg)[:200])


# ---- tokenizer ---------------------------------------------------------------------------------------------
def tokenizer():
    j = json.loads(read("data/tokenizer.json"))
    keep = 2 + 256 + 40
    m = j["model"]
    vocab = {t: i for t, i in m["vocab"].items() if i < keep}
    merges = []
    for mg in m["merges"]:
        a, b = mg.split(" ") if isinstance(mg, str) else mg
        if a in vocab and b in vocab and a + b in vocab:
            merges.append(mg)
    small = dict(j)
    small["model"] = dict(m, vocab=vocab, merges=merges)
    text = json.dumps(small, ensure_ascii=False, separators=(",", ":")).encode()
    out("tokenizer", "json-small", b"\x00" + text)
    gpt2 = dict(small, pre_tokenizer={"type": "ByteLevel", "add_prefix_space": True, "use_regex": True})
    out("tokenizer", "json-gpt2-prefix", b"\x00" + json.dumps(gpt2, ensure_ascii=False).encode())
    pairs = dict(small)
    pairs["model"] = dict(small["model"], merges=[mg.split(" ") for mg in merges], ignore_merges=True,
                          unk_token=next(iter(vocab)))
    out("tokenizer", "json-pairs", b"\x00" + json.dumps(pairs, ensure_ascii=False).encode())
    nobytes = dict(small)
    nobytes["model"] = dict(small["model"], vocab={t: i for t, i in list(vocab.items())[:40]}, merges=[])
    out("tokenizer", "json-few-bytes", b"\x00" + json.dumps(nobytes, ensure_ascii=False).encode())
    sparse = dict(small)
    sparse["model"] = dict(small["model"], vocab=dict(vocab, zz=2147483646))
    out("tokenizer", "json-sparse-id", b"\x00" + json.dumps(sparse, ensure_ascii=False).encode())
    badre = dict(small, pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": False},
        {"type": "Split", "pattern": {"String": "\u00e9"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]})
    out("tokenizer", "json-regex", b"\x00" + json.dumps(badre, ensure_ascii=False).encode())
    out("tokenizer", "json-broken", b"\x00" + b'{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a"]}}')
    # texts for the shipped tokenizer (mode 1)
    corpus = read("data/corpus.jsonl").decode().splitlines()
    out("tokenizer", "text-corpus", b"\x01" + json.loads(corpus[0])["text"][:2000].encode())
    out("tokenizer", "text-mixed", b"\x01" + "Hello 世界! 123456 ｜x｜ <｜begin▁of▁sentence｜>ok\r\n\t  é\u0085".encode())
    out("tokenizer", "text-invalid-utf8", b"\x01abc\xff\xfe\xc3(\xed\xa0\x80")
    out("tokenizer", "text-emoji", b"\x01" + "👍🏽 family: 👨‍👩‍👧 flags 🇩🇪".encode())
    # ids (mode 2): uint16 LE, minus 16
    ids = [16 + i for i in (0, 1, 2, 300, 4095, 4096)] + [0, 65535]
    out("tokenizer", "ids", b"\x02" + b"".join(struct.pack("<H", i) for i in ids))
    out("tokenizer", "ids-partial-utf8", b"\x02" + b"".join(struct.pack("<H", 16 + 2 + b) for b in (0xE4, 0xBD, 0x41)))


# ---- idx --------------------------------------------------------------------------------------------------
def idx_file(code, seqs, docs, item):
    sizes = b"".join(struct.pack("<i", len(s)) for s in seqs)
    ptrs, off = b"", 0
    for s in seqs:
        ptrs += struct.pack("<q", off)
        off += len(s) * item
    fmt = {1: "B", 2: "b", 3: "h", 4: "i", 5: "q", 8: "H"}[code]
    bin_ = b"".join(struct.pack("<" + fmt * len(s), *s) for s in seqs)
    idx = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + bytes([code]) + struct.pack("<QQ", len(seqs), len(docs)) + sizes
           + ptrs + b"".join(struct.pack("<q", d) for d in docs))
    return idx, bin_


def idx():
    def raw(name, idx_, bin_):
        out("idx", name, b"\x00" + struct.pack("<H", len(bin_)) + bin_ + idx_)
    seqs = [[1, 2, 3], [4000, 5], [], [7, 8, 9, 10]]
    raw("u16", *idx_file(8, seqs, [0, 1, 2, 3, 4], 2))
    raw("i32-multiseq-docs", *idx_file(4, seqs, [0, 2, 4], 4))
    raw("u8", *idx_file(1, [[1, 2], [3]], [0, 2], 1))
    raw("i64", *idx_file(5, [[1 << 40, -1]], [0, 1], 8))
    raw("empty", *idx_file(8, [], [0], 2))
    i, b = idx_file(8, seqs, [0, 1, 2, 3, 4], 2)
    raw("truncated", i[:-3], b)
    raw("bad-magic", b"MMIDIDY" + i[7:], b)
    raw("bin-short", i, b[:-2])
    i2 = bytearray(i)
    i2[18:26] = struct.pack("<Q", (1 << 64) - 1)
    raw("huge-count", bytes(i2), b)
    # structured form: code, S, D, then the arrays, then the .bin
    for name, code, seqs_, docs in [("s-u16", 8, seqs, [0, 1, 2, 3, 4]), ("s-i16", 3, [[-1, 2]], [0, 1]),
                                    ("s-f32", 7, [[1]], [0, 1]), ("s-negative-len", 8, [[1, 2]], [0, 1])]:
        item = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 7: 4, 8: 2}[code]
        ii, bb = idx_file(code if code != 7 else 4, seqs_, docs, item)
        body = ii[34:]
        if name == "s-negative-len":
            body = struct.pack("<i", -5) + body[4:]
        out("idx", name, bytes([1, code, len(seqs_), len(docs)]) + body + bb)


# ---- dictionaries (tests/fuzz/dict/, libFuzzer -dict=) ------------------------------------------------------
def dict_line(t):
    return '"' + "".join(c if c.isprintable() and c not in '\\"' else
                         ("\\" + c if c in '\\"' else "\\x%02X" % ord(c)) for c in t) + '"'


def dicts():
    d = os.path.join(HERE, "dict")
    os.makedirs(d, exist_ok=True)
    import re
    names = re.findall(r'\.name = "([^"]+)"', read("src/core/deck_keys.cpp", "r"))
    toks = set()
    for n in names:
        sec, key = n.rsplit(".", 1)
        toks |= {"[" + sec + "]", key + " = ", n + "="}
    toks |= {"include = ", "#!overrides\n", "dsv3-deck-v1", " # ", '"', "true", "false", "yes", "off", "1e308",
             "-1", "9223372036854775807", "9223372036854775808", "nan", "inf", "0x10", "cpu", "cuda", "yarn"}
    with open(os.path.join(d, "deck.dict"), "w") as f:
        f.write("# libFuzzer dictionary of fuzz_deck (generated by make_seeds.py from src/core/deck_keys.cpp)\n")
        f.write("".join(dict_line(t) + "\n" for t in sorted(toks)))
    lit = ["{", "}", "[", "]", ":", ",", "null", "true", "false", "0", "-1", "1e400", "1.5", "4.0",
           "18446744073709551615", "18446744073709551616", "9223372036854775807", "-9223372036854775808",
           "4611686018427387904", "4294967296", "2147483647", "\\u0000", "\\ud800"]
    keys = ["__metadata__", "dtype", "shape", "data_offsets", "F32", "F16", "BF16", "F8_E4M3", "I64", "I32", "F64",
            "weight_map", "metadata", "total_size", "_scale_inv", "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors", "fuzz.safetensors", "../",
            "model", "type", "BPE", "vocab", "merges", "unk_token", "ignore_merges", "dropout", "byte_fallback",
            "continuing_subword_prefix", "end_of_word_suffix", "added_tokens", "id", "content", "special", "lstrip",
            "rstrip", "single_word", "normalizer", "normalizers", "Sequence", "pre_tokenizer", "pretokenizers",
            "Split", "pattern", "Regex", "String", "behavior", "Isolated", "invert", "ByteLevel", "add_prefix_space",
            "use_regex", "decoder"]
    cfg = json.loads(read("tests/golden/tiny/config.json"))
    keys += sorted(cfg) + sorted(cfg["rope_scaling"]) + ["rope_type", "weight_block_size"]
    with open(os.path.join(d, "json.dict"), "w") as f:
        f.write("# libFuzzer dictionary of the JSON-reading targets (generated by make_seeds.py)\n")
        f.write("".join(dict_line(t) + "\n" for t in lit + ['"%s"' % k for k in keys]))
    with open(os.path.join(d, "idx.dict"), "w") as f:
        f.write("# libFuzzer dictionary of fuzz_idx (generated by make_seeds.py)\n")
        for t in [b"MMIDIDX\0\0", struct.pack("<Q", 1), struct.pack("<q", -1), struct.pack("<Q", (1 << 63) - 1),
                  struct.pack("<i", -1), struct.pack("<i", (1 << 31) - 1)]:
            f.write('"' + "".join("\\x%02X" % b for b in t) + '"\n')


# ---- checkpoint (the layout at the top of fuzz_checkpoint.cpp: options byte, then opcode + operands) -------------
def checkpoint():
    def s8(b):  # a length-prefixed string operand
        b = b.encode() if isinstance(b, str) else b
        return bytes([len(b)]) + b if len(b) < 255 else b"\xff" + struct.pack("<H", len(b)) + b

    q = struct.pack
    seeds = {
        "clean-full": b"\x00",
        "clean-converted": b"\x01",
        "clean-all-calls": b"\x1e",
        "clean-converted-all-calls": b"\x1f",
        # 0 int attr: "/" iteration I64LE scalar -1; adam_t as a 3-element array; consumed_tokens NaN (F64 raw bits)
        "iteration-negative": b"\x00" + b"\x00\x00\x02\x03\x00" + q("<q", -1),
        "adam-t-array": b"\x00" + b"\x00\x00\x05\x03\x0e" + q("<q", 5),
        "tokens-nan": b"\x00" + b"\x00\x00\x04\x09\x00" + q("<Q", 0x7FF8000000000001),
        "format-version-null": b"\x00" + b"\x00\x00\x00\x03\x01" + q("<q", 1),
        # 1 str attr: the deck as a 2-element array; the deck spliced; hf_config spliced; moment_dtype variable-length
        "deck-array": b"\x00" + b"\x01\x00\x08\x00\x0a\x00" + s8("[model]\nvocab_size = 32\n"),
        "deck-splice": b"\x1c" + b"\x01\x00\x08\x00\x00\x01" + q("<H", 9) + b"\x10" + s8("vocab_size = -5\n"),
        "hf-config-splice": b"\x05" + b"\x01\x00\x0c\x00\x00\x01" + q("<H", 1) + b"\x00" +
                            s8('"vocab_size": 1e400, "n_group": [1,2], '),
        "hf-config-cut": b"\x05" + b"\x01\x00\x0c\x03\x00\x02" + q("<H", 40),
        "moment-dtype-vlen": b"\x00" + b"\x01\x00\x0a\x04\x00\x00" + s8("bf16"),
        # 2/3 delete / rename attributes: a dataset's checksum, the root's iteration
        "checksum-deleted": b"\x00" + b"\x02\x09\x0d",
        "iteration-renamed": b"\x00" + b"\x03\x00\x02\x0e" + s8("iter"),
        # 4 redataset: null space, scalar, huge shape without storage, one more row, f64, chunked + deflate
        "dataset-null": b"\x00" + b"\x04\x03\x00\x05\x00\x00\x01",
        "dataset-scalar": b"\x00" + b"\x04\x03\x00\x00\x00\x00\x01",
        "dataset-huge": b"\x00" + b"\x04\x04\x00\x02\xf5\xf5\x01\x02\x01",
        "dataset-extra-row": b"\x00" + b"\x04\x05\x00\x02\x04\x03\x00\x00\x01",
        "dataset-f64": b"\x00" + b"\x04\x06\x02\x02\x03\x03\x00\x00\x01",
        "dataset-deflate": b"\x00" + b"\x04\x07\x00\x02\x03\x03\x06\x00\x01",
        "dataset-unallocated": b"\x1c" + b"\x04\x08\x00\x02\x03\x03\x01\x02\x01",
        # 5-8 links: delete /model, move a dataset onto another, a soft link, a dangling link, an extra group
        "model-deleted": b"\x00" + b"\x05\x01",
        "dataset-moved": b"\x00" + b"\x06\x0a\x0b",
        "soft-link": b"\x00" + b"\x07\x0c\x01\x0d",
        "dangling-link": b"\x00" + b"\x07\x0c\x02\x0e",
        "external-link": b"\x04" + b"\x07\x0c\x03\x0f",
        "extra-group": b"\x00" + b"\x08\xc1" + s8("extra") + b"\x00",
        "extra-string-dataset": b"\x00" + b"\x08\xc1" + s8("notes") + b"\x02",
        # 9/10 data: written (checksum mismatch), written and the checksum fixed
        "data-written": b"\x00" + b"\x09\x05" + q("<H", 0) + b"\x03" + q("<I", 0x7FC00000),
        "data-written-sum-fixed": b"\x08" + b"\x09\x05" + q("<H", 0) + b"\x03" + q("<I", 0x3F800000) + b"\x0a\x05",
        # 11-14 file edits: truncate, flip raw data, latest variants, extra directory entries
        "truncated-half": b"\x00" + b"\x0b" + q("<H", 0x8000),
        "raw-flip": b"\x00" + b"\x0c\x02" + q("<I", 5) + b"\x10",
        "latest-cr": b"\x10" + b"\x0d\x02\x00",
        "latest-missing-file": b"\x14" + b"\x0d\x05\x00",
        "latest-deleted": b"\x14" + b"\x0d\x00\x00",
        "dir-iteration-beyond-int64": b"\x00" + b"\x0e\x00" + s8("99999999999999999999999"),
        "dir-good-older-copy": b"\x10" + b"\x0b" + q("<H", 0x4000) + b"\x0e\x01" + s8("\x00\x00\x00\x00\x00\x03"),
        "dir-empty-and-dir": b"\x10" + b"\x0e\x02" + s8("\x09") + b"\x0e\x03" + s8("\x08"),
    }
    for name, data in seeds.items():
        out("checkpoint", name, data)
    names = ["format_version", "dsv3_version", "iteration", "consumed_samples", "consumed_tokens", "adam_t",
             "rng_seed", "rng_state", "deck", "layout", "moment_dtype", "checksum_algorithm", "hf_config", "checksum",
             "/model", "/optim/master", "/optim/exp_avg", "/optim/exp_avg_sq", "[model]", "vocab_size = ",
             "hidden_size = ", "num_hidden_layers = ", "n_routed_experts = ", "include = ", "hf_config = ",
             '"vocab_size": ', '"hidden_size": ', '"n_group": ', '"rope_scaling": ', "null", "1e400", "-1",
             "99999999999999999999", "iter_", ".h5", ".tmp", "latest"]
    with open(os.path.join(HERE, "dict", "checkpoint.dict"), "w") as f:
        f.write("# libFuzzer dictionary of fuzz_checkpoint (generated by make_seeds.py): attribute and object names,\n"
                "# deck and config.json fragments for the string operands, and extreme 64-bit values\n")
        for t in names:
            f.write(dict_line(t) + "\n")
        for v in [q("<q", -1), q("<q", 2**63 - 1), q("<q", -2**63), q("<Q", 0x7FF0000000000000), q("<Q", 0x7FF8000000000001)]:
            f.write('"' + "".join("\\x%02X" % b for b in v) + '"\n')


def main():
    if os.path.isdir(OUT) and "--keep" not in sys.argv:
        shutil.rmtree(OUT)
    decks()
    safetensors()
    hf_index()
    configs()
    tokenizer()
    idx()
    dicts()
    checkpoint()
    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(OUT) for f in fs)
    n = sum(len(fs) for _, _, fs in os.walk(OUT))
    print(f"{n} seed files, {total} bytes in {OUT}")


if __name__ == "__main__":
    main()
