#!/usr/bin/env python3
"""Unigram entropy (nats/token) of a Megatron indexed dataset (.bin/.idx): the loss of a model that knows only token
frequencies. A trained language model's validation loss must be clearly below it.
  validation/unigram_entropy.py PREFIX"""
import struct
import sys

import numpy as np

DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}


def main():
    prefix = sys.argv[1]
    with open(prefix + ".idx", "rb") as f:
        head = f.read(9 + 8 + 1)
        assert head[:9] == b"MMIDIDX\x00\x00", f"{prefix}.idx: not an MMIDIDX index"
        dtype = DTYPES[head[17]]
    tokens = np.fromfile(prefix + ".bin", dtype=dtype)
    counts = np.bincount(tokens.astype(np.int64))
    p = counts[counts > 0] / len(tokens)
    print(f"{-(p * np.log(p)).sum():.4f}")


if __name__ == "__main__":
    main()
