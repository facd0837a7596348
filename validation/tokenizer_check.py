#!/usr/bin/env python3
"""Checks dsv3's tokenizer against Hugging Face `tokenizers` (the reference implementation).

Encodes every document of the corpus, plus a set of harder strings (Unicode letters and marks, CJK,
digits, white space of every kind, emoji, special tokens), with
  * dsv3: `dsv3-preprocess` writes PREFIX.bin/.idx, read back here, and
  * Hugging Face: tokenizers.Tokenizer.from_file(...).encode(text, add_special_tokens=False).ids
and compares the ids document by document. Prints the numbers compared and the mismatches; exits 1 on any.

    python3 -m venv /tmp/venv-tok && /tmp/venv-tok/bin/pip install tokenizers
    /tmp/venv-tok/bin/python validation/tokenizer_check.py --build-dir build
"""
import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile

EXTRA = [
    "Hello, world! 12345 6789 0.5 1,000,000 3.14159",
    "日本語のテキスト、カタカナ テスト 中文字符和标点。ひらがなカタカナ漢字",
    "naïve café — “quotes” ‘single’ … ½ ² ³ № ™",
    "tabs\tand\r\nCRLF\n\n\n  spaces   \n\t\n",
    "emoji 😀👍🏽 and ZWJ 👨‍👩‍👧 flags 🇫🇷",
    "NBSP\u00a0here\u2003em\u3000ideographic\u0085nel\u2028line\u2029para end \u0085\u0085 x \u0085",
    "<｜begin▁of▁sentence｜>Hello<｜end▁of▁sentence｜>x<｜end▁of▁sentence｜><｜begin▁of▁sentence｜>",
    "$100.50 #tag @user a-b_c (x) [y] {z} ~/.bashrc C++ i++ a==b a!=b",
    "Ελληνικά Русский текст العربية हिन्दी ภาษาไทย 한국어",
    "combining e\u0301 a\u0308 n\u0303 \u0301leading mark",
    "'s 're I'll don't WON'T o'clock",
    "zero\u200bwidth soft\u00adhyphen bom\ufeffmark",
    "x" * 3000 + " " + "ab" * 500 + "\n" * 50 + " " * 40 + "end",
    "   leading spaces and trailing spaces   ",
    "\n",
    "١٢٣ ٤٥٦٧ ①②③ ⅠⅡⅢ 𝟙𝟚𝟛",
    "Mixed: CamelCaseWords, snake_case_words, kebab-case-words, UPPER_CASE.",
    "def f(x):\n    return x**2  # comment\n\nif __name__ == '__main__':\n\tprint(f(3))\n",
]


def read_mmidx(prefix):
    with open(prefix + ".idx", "rb") as f:
        idx = f.read()
    assert idx[:9] == b"MMIDIDX\x00\x00", "bad magic"
    version, = struct.unpack_from("<Q", idx, 9)
    code = idx[17]
    n_seq, n_doc = struct.unpack_from("<QQ", idx, 18)
    assert version == 1
    fmt = {1: "B", 2: "b", 3: "h", 4: "i", 5: "q", 8: "H"}[code]
    item = struct.calcsize(fmt)
    sizes = struct.unpack_from(f"<{n_seq}i", idx, 34)
    pointers = struct.unpack_from(f"<{n_seq}q", idx, 34 + 4 * n_seq)
    doc_idx = struct.unpack_from(f"<{n_doc}q", idx, 34 + 12 * n_seq)
    with open(prefix + ".bin", "rb") as f:
        data = f.read()
    seqs = [list(struct.unpack_from(f"<{n}{fmt}", data, p)) for n, p in zip(sizes, pointers)]
    docs = []
    for d in range(len(doc_idx) - 1):
        docs.append([t for s in seqs[doc_idx[d]:doc_idx[d + 1]] for t in s])
    assert all(p % item == 0 for p in pointers)
    return docs


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build-dir", default=os.path.join(root, "build"))
    ap.add_argument("--preprocess", help="the dsv3-preprocess program (default: BUILD_DIR/dsv3-preprocess)")
    ap.add_argument("--tokenizer", default=os.path.join(root, "data", "tokenizer.json"))
    ap.add_argument("--corpus", default=os.path.join(root, "data", "corpus.jsonl"))
    ap.add_argument("--no-extra", action="store_true", help="only the corpus, not the extra strings")
    args = ap.parse_args()
    try:
        from tokenizers import Tokenizer
    except ImportError:
        sys.exit("tokenizer_check: needs the Hugging Face `tokenizers` package (pip install tokenizers)")
    prog = args.preprocess or os.path.join(args.build_dir, "dsv3-preprocess")
    if not os.access(prog, os.X_OK):
        sys.exit(f"tokenizer_check: {prog} not found (build dsv3 first, or give --build-dir/--preprocess)")

    texts = []
    with open(args.corpus, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                texts.append(json.loads(line)["text"])
    n_corpus = len(texts)
    if not args.no_extra:
        texts += EXTRA

    hf = Tokenizer.from_file(args.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = os.path.join(tmp, "in.jsonl")
        with open(jsonl, "w", encoding="utf-8") as f:
            for t in texts:
                f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
        prefix = os.path.join(tmp, "out")
        r = subprocess.run([prog, "--input", jsonl, "--tokenizer", args.tokenizer, "--output-prefix", prefix,
                            "--workers", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            sys.exit(f"tokenizer_check: {prog} failed:\n{r.stderr}")
        ours = read_mmidx(prefix)

    assert len(ours) == len(texts), f"dsv3-preprocess wrote {len(ours)} documents for {len(texts)} texts"
    mismatches, n_tokens = 0, 0
    for i, (t, mine) in enumerate(zip(texts, ours)):
        ref = hf.encode(t, add_special_tokens=False).ids
        n_tokens += len(ref)
        if ref != mine:
            mismatches += 1
            if mismatches <= 5:
                k = next((j for j, (a, b) in enumerate(zip(ref, mine)) if a != b), min(len(ref), len(mine)))
                what = "corpus document" if i < n_corpus else "extra string"
                print(f"MISMATCH {what} {i}: first difference at token {k}: hf {ref[k:k + 8]} "
                      f"({[hf.id_to_token(x) for x in ref[k:k + 8]]}) dsv3 {mine[k:k + 8]} "
                      f"({[hf.id_to_token(x) for x in mine[k:k + 8]]})")
        if hf.decode(ref, skip_special_tokens=False) != t and i < n_corpus:
            print(f"note: Hugging Face decode does not round-trip corpus document {i}")
    print(f"tokenizer_check: {len(texts)} documents ({n_corpus} corpus + {len(texts) - n_corpus} extra), "
          f"{n_tokens} tokens compared, {mismatches} mismatching documents")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
