#!/usr/bin/env python3
"""Writes tests/fixtures/gguf-kquants.json: raw blocks of the k-quant types (Q4_K, Q5_K, Q6_K)
and of Q5_0 / Q5_1 (which llama.cpp's Q4_K_M / Q5_K_M use for rows that are not whole
256-element super-blocks), with gguf-py's dequantisation of them as the reference.

Run from the repository root:
    /work/venv-fixtures/bin/python scripts/make_kquant_fixture.py

Random bytes are valid blocks of these types except that the f16 scales (d, dmin / m) must be
finite, so those fields are overwritten with random finite f16 values. Each type also gets one
block of all-ones bits (largest quants and scales) with finite scales. The expected values are
stored as f32 bit patterns (u32) so the Rust test can compare bit for bit.

It also writes `llama3_rope`: for the published Llama-3.1 8B and Llama-3.2 1B RoPE settings,
the [Dh/2] `rope_freqs.weight` factors computed the way llama.cpp's converter does (every step
in float32 torch arithmetic, the least precise case), and transformers' own llama3 inverse
frequencies (ROPE_INIT_FUNCTIONS["llama3"]), which the converted config must reproduce.
"""

import json
import pathlib

import math

import numpy as np
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

# Byte offsets of the f16 scale fields in each block (from llama.cpp's block structs).
F16_FIELDS = {
    T.Q5_0: [0],  # d
    T.Q5_1: [0, 2],  # d, m
    T.Q4_K: [0, 2],  # d, dmin
    T.Q5_K: [0, 2],  # d, dmin
    T.Q6_K: [208],  # d (after ql[128], qh[64], scales[16])
}
RANDOM_BLOCKS = 3


def finite_f16(rng: np.random.Generator) -> bytes:
    """A random f16 whose exponent is not all ones (so not inf / NaN), either sign."""
    while True:
        bits = int(rng.integers(0, 1 << 16))
        if (bits >> 10) & 0x1F != 0x1F:
            return bits.to_bytes(2, "little")


def blocks(ty: T, rng: np.random.Generator) -> bytes:
    _, size = GGML_QUANT_SIZES[ty]
    out = bytearray()
    for b in range(RANDOM_BLOCKS + 1):
        if b < RANDOM_BLOCKS:
            blk = bytearray(rng.integers(0, 256, size=size, dtype=np.uint8).tobytes())
        else:
            blk = bytearray(b"\xff" * size)
        for at in F16_FIELDS[ty]:
            blk[at:at + 2] = finite_f16(rng)
        out += blk
    return bytes(out)


def converter_factors(theta: float, dh: int, factor: float, lf: float, hf: float, ctx: int) -> list[float]:
    """The factors (1 / per-frequency divisor) in float32 torch, as llama.cpp's converter."""
    freqs = 1.0 / (theta ** (torch.arange(0, dh, 2, dtype=torch.float32) / dh))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq  # a float32 tensor
        if wavelen < ctx / hf:
            out.append(1.0)
        elif wavelen > ctx / lf:
            out.append(factor)
        else:
            smooth = (ctx / wavelen - lf) / (hf - lf)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32).tolist()


def llama3_rope() -> list[dict]:
    cases = []
    for name, dh, factor in [("Llama-3.1-8B", 128, 8.0), ("Llama-3.2-1B", 64, 32.0)]:
        theta, lf, hf, ctx = 500000.0, 1.0, 4.0, 8192
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": lf,
                   "high_freq_factor": hf, "original_max_position_embeddings": ctx}
        cfg = LlamaConfig(hidden_size=dh * 4, num_attention_heads=4, head_dim=dh,
                          rope_theta=theta, rope_scaling=scaling, max_position_embeddings=131072)
        inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
        cases.append({
            "model": name, "rope_theta": theta, "head_dim": dh, "rope_scaling": scaling,
            "factors": converter_factors(theta, dh, factor, lf, hf, ctx),
            "hf_inv_freq": inv_freq.to(torch.float32).tolist(),
        })
    return cases


def main() -> None:
    rng = np.random.default_rng(20261127)
    cases = []
    for ty in [T.Q4_K, T.Q5_K, T.Q6_K, T.Q5_0, T.Q5_1]:
        raw = blocks(ty, rng)
        values = dequantize(np.frombuffer(raw, dtype=np.uint8), ty).astype(np.float32)
        block, size = GGML_QUANT_SIZES[ty]
        assert values.size == len(raw) // size * block
        assert np.isfinite(values).all(), ty.name
        cases.append({
            "type": ty.name,
            "type_id": int(ty),
            "block_elements": block,
            "block_bytes": size,
            "bytes_hex": raw.hex(),
            "f32_bits": values.view(np.uint32).tolist(),
        })
    out = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/gguf-kquants.json"
    doc = {
        "source": "gguf-py (gguf.quants.dequantize), scripts/make_kquant_fixture.py",
        "cases": cases,
        "llama3_rope": llama3_rope(),
    }
    out.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
