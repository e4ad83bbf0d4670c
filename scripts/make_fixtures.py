#!/usr/bin/env python3
"""Make tiny random Qwen2 / Llama checkpoints and record what HF transformers computes on them.

Why: the Rust CPU backend must be checked against an implementation nobody on this project
wrote. This script builds five tiny HF-transformers checkpoints with random (but well
conditioned) weights, then records HF's own outputs on them as the reference.

Run from the repo root (pinned versions in scripts/requirements-fixtures.txt):

    python3 scripts/make_fixtures.py

It (re)writes, under tests/fixtures/:

  qwen2-f32/            Qwen2ForCausalLM, f32, q/k/v biases, GQA 4q/2kv heads, D=64, Dh=16,
                        F=160, 3 layers, V=320, untied. Also tokenizer.json + tokenizer_config.json.
  qwen2-bf16-tied/      Qwen2, bf16 weights on disk, tied embeddings (no lm_head.weight saved).
  llama-f32/            LlamaForCausalLM, f32, GQA, rope_theta 500000 with llama3 rope_scaling
                        (original context 64, so the scaling really changes frequencies at Dh=16),
                        untied, eos_token_id a list [1, 2].
  llama-bf16-tied/      Llama, bf16, tied, explicit head_dim 32 != hidden/heads (64/4 = 16), V=288.
  thinking-qwen2-f32/   Qwen2, 4 layers, other seed, same vocabulary (ids) as qwen2-f32, with a
                        tokenizer that adds <think> and </think>; the "thinking" half of a hybrid
                        pair whose base is qwen2-f32.
  tokenizer_reference.json  ids/decodes/chat-template strings from AutoTokenizer for both tokenizers.

Each model folder is a checkpoint as `save_pretrained` writes it (config.json,
generation_config.json, model.safetensors) plus reference.safetensors holding
(shapes: T prompt tokens, V vocab, D model dim, G = 20 greedy tokens):

  prompt_ids        int64 [T]       the prompt
  logits            f32   [T, V]    logits at every position of one full forward of the prompt
  resid.L           f32   [T, D]    output of decoder block L (0-based), from a forward hook on
                                    model.model.layers[L] -- NOT hidden_states[-1], which HF
                                    stores after the final norm
  greedy_ids        int64 [G]       greedy continuation of prompt_ids, eos disabled so exactly G come
  prompt2_ids       int64 [T2]      a second prompt of another length (for batch-of-rows tests)
  greedy2_ids       int64 [G]       its greedy continuation
  prompt_long_ids   int64 [100]     llama-f32 only: a prompt longer than original_max_position_embeddings
  logits_long_last  f32   [V]       llama-f32 only: logits at its last position

and the safetensors metadata key `info`: a JSON string with versions and how it was computed.

How the reference is computed: every reference is computed by the model RELOADED from the
saved folder with `from_pretrained(dir, dtype=float32, attn_implementation="eager")`. For the
bf16 checkpoints that means: the bf16 weights on disk are upcast to float32 and the whole forward
runs in float32, so the reference is exact f32 arithmetic over bf16-rounded weights (the RoPE
inverse frequencies are recomputed in f32 at load, never rounded to bf16). Greedy ids come from
a plain loop of full forwards (argmax of the last position, no KV cache), cross-checked against
`model.generate(do_sample=False)` with its KV cache.

Weights are drawn N(0, INIT_STD) (norm weights U(0.5, 1.5)), much larger than HF's 0.02, so that
logits are well separated: every recorded greedy step must have top1 - top2 >= 1e-2 * max(1, |top1|),
and each greedy run must hold >= MIN_DISTINCT distinct ids (no run stuck on one token),
else the model is re-drawn with the next seed. The script prints the smallest gap it saw.
Everything runs on one CPU thread with fixed seeds, so reruns give the same files.
"""

import json
import os
import shutil
import sys
import tempfile

import numpy as np
import tokenizers
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

OUT_DIR = os.path.join("tests", "fixtures")
INIT_STD = 0.15  # std of every linear / embedding weight and bias
GREEDY_LEN = 20
LONG_PROMPT_LEN = 100
MAX_RESEEDS = 200
# A recorded greedy step counts as "well separated" when top1 - top2 >= GAP_REL * max(1, |top1|):
# f32 reimplementations differ from HF by ~1e-6 relative, so 1e-2 leaves a wide margin.
GAP_REL = 1e-2
# Each greedy continuation must hold at least this many distinct ids: a model stuck repeating one
# token would let a KV-cache or position bug go unnoticed.
MIN_DISTINCT = 10

# ---------------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE with Qwen2-style pre-tokenization, trained on made-up math text.
# ---------------------------------------------------------------------------------------------

# Qwen2's pre-tokenizer split pattern (contractions, letter runs, single digits, punctuation runs,
# newlines, whitespace); used here so the fixture exercises the same code path as real Qwen2.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

TRAIN_TEXT = [
    "Let x be the number of apples. Then 3x + 4 = 19, so 3x = 15 and x = 5.",
    "The sum of the first n odd numbers is n squared, so the sum of the first 7 odd numbers is 49.",
    "We compute the product: 12 times 12 is 144, and 144 minus 44 is 100.",
    "If the triangle has sides 3, 4 and 5, then it is a right triangle because 9 + 16 = 25.",
    "Therefore the answer is 42. Let us check the answer: 6 times 7 is 42.",
    "The number of ways to choose 2 of 5 items is 10, because 5 times 4 divided by 2 is 10.",
    "Step 1: subtract 8 from both sides. Step 2: divide both sides by 2. The answer is x = 6.",
    "The square of the sum is not the sum of the squares, since (a + b)^2 = a^2 + 2ab + b^2.",
    "Then the total is the number of rows times the number of columns, which is 6 times 8 = 48.",
    "So the remainder of 100 divided by 7 is 2, because 7 times 14 is 98.",
    "Let us think step by step. First, the number is even. Then the number is a square.",
    "The answer is the number of integers between 1 and 50 that are divisible by 3, which is 16.",
]

N_MERGES = 50
BASE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK_TOKENS = ["<think>", "</think>"]

# ChatML-style template, written for this project. Roles are rendered verbatim; only
# add_generation_prompt adds text beyond the turns.
CHAT_TEMPLATE_BASE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHAT_TEMPLATE_THINK = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)


def bytes_to_unicode():
    """The GPT-2 byte -> printable-char table that ByteLevel uses: printable Latin-1 bytes map to
    themselves, the other 68 bytes to chars from U+0100 upward, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def pre_tokenizer():
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )


def train_merges():
    """Train N_MERGES byte-level merges on TRAIN_TEXT; returns [(left, right), ...] in rank order."""
    tok = Tokenizer(BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizer()
    trainer = BpeTrainer(
        vocab_size=256 + N_MERGES,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(TRAIN_TEXT, trainer=trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    if len(merges) != N_MERGES:
        sys.exit(f"tokenizer: expected {N_MERGES} merges from the training text, found {len(merges)}")
    return merges


def build_tokenizer(merges, specials):
    """Byte tokens at ids 0..255 in byte order, merged tokens at 256.. in rank order, then the
    special tokens (so a tokenizer with more specials extends, never renumbers, the base one)."""
    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tok = Tokenizer(BPE(vocab=vocab, merges=list(merges), fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizer()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    for s in specials:
        # <think>/</think> are ordinary added tokens (kept by skip_special_tokens), as in Qwen3 / R1 distills.
        is_special = s not in THINK_TOKENS
        token = AddedToken(s, special=is_special, normalized=False, lstrip=False, rstrip=False, single_word=False)
        if is_special:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
    return tok


def write_tokenizer(tok, out_dir, specials, chat_template):
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    added_decoder = {}
    for s in specials:
        added_decoder[str(tok.token_to_id(s))] = {
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": s not in THINK_TOKENS,
        }
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added_decoder,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
        "chat_template": chat_template,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
        f.write("\n")


TOKENIZER_TEST_STRINGS = [
    "",
    "Hello world",
    "The answer is 42.",
    "12345 + 678 = 13023",
    "  two  leading spaces and   runs   of spaces ",
    "line one\nline two\n\n\nafter blank lines\n",
    "tab\tseparated\tvalues\r\nwindows line end",
    "Let x be the number of apples, so 3x + 4 = 19.",
    "café naïve résumé",
    "cafe\u0301 (not NFC: e + combining acute)",
    "∑ x² ≤ 1 and π ≈ 3.14159",
    "数学 is math; Ελληνικά",
    "emoji: 🙂🚀 and flag 🇫🇷",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "<think>\nSo 2+2=4.\n</think>\nThe answer is 4.",
    "don't we'll it's I'M",
]

CHAT_QUESTIONS = [
    "What is 12 + 7?",
    "A train travels 60 km in 1.5 hours.\nWhat is its average speed?",
]


def tokenizer_reference(name, out_dir):
    """What AutoTokenizer does with the saved folder: encodes, decodes, chat templates."""
    tok = AutoTokenizer.from_pretrained(out_dir)
    enc = []
    for s in TOKENIZER_TEST_STRINGS:
        ids = tok.encode(s, add_special_tokens=False)
        enc.append({"text": s, "ids": ids, "decoded": tok.decode(ids)})
    chat = []
    for q in CHAT_QUESTIONS:
        msgs = [{"role": "user", "content": q}]
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"]) if isinstance(ids, dict) or hasattr(ids, "keys") else list(ids)
        if ids != tok.encode(text, add_special_tokens=False):
            sys.exit(f"{name}: chat template ids differ from encode(text) for {q!r}")
        chat.append({"question": q, "text": text, "ids": ids})
    return {
        "dir": name,
        "vocab_size_with_added": len(tok),
        "added_tokens": {t.content: i for i, t in sorted(tok.added_tokens_decoder.items())},
        "eos_token": tok.eos_token,
        "eos_token_id": tok.eos_token_id,
        "bos_token": tok.bos_token,
        "encode": enc,
        "chat": chat,
    }


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def init_weights(model, seed):
    """Overwrite every parameter from a seeded generator, in name order (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("norm.weight"):
                # Not all ones, so a backend that ignores the norm weight fails the check.
                p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float32) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * INIT_STD)


def load_f32(path, cls):
    """The reference model: the saved checkpoint upcast to f32, eager attention, eval mode."""
    m = cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    m.eval()
    for name, buf in m.named_buffers():
        if buf.is_floating_point() and buf.dtype != torch.float32:
            sys.exit(f"{path}: buffer {name} is {buf.dtype}, expected float32 for the reference")
    return m


def forward_with_resid(model, ids):
    """Full forward of one prompt. Returns logits [T, V] and the block outputs [L][T, D]."""
    captured = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):

        def hook(_mod, _inp, out, i=i):
            captured[i] = (out[0] if isinstance(out, tuple) else out).detach()

        hooks.append(layer.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = model(input_ids=ids[None, :], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    resid = [captured[i][0].clone() for i in range(len(model.model.layers))]
    return out.logits[0].clone(), resid


def top_gap(row):
    """(top1 - top2, required gap) for one logits row [V]."""
    top = torch.topk(row, 2).values
    return float(top[0] - top[1]), GAP_REL * max(1.0, abs(float(top[0])))


def greedy(model, prompt):
    """Greedy continuation by full forwards (no KV cache), eos ignored. Returns ids [G] and the
    smallest gap ratio gap/required over the G steps (< 1 means some step is too close)."""
    seq = prompt.clone()
    worst = float("inf")
    new = []
    with torch.no_grad():
        for _ in range(GREEDY_LEN):
            row = model(input_ids=seq[None, :], use_cache=False).logits[0, -1]
            gap, need = top_gap(row)
            worst = min(worst, gap / need)
            nxt = int(torch.argmax(row))
            new.append(nxt)
            seq = torch.cat([seq, torch.tensor([nxt], dtype=torch.int64)])
    return torch.tensor(new, dtype=torch.int64), worst


def greedy_generate(model, prompt):
    """The same continuation via HF generate (KV cache), eos disabled so exactly G tokens come."""
    gc = GenerationConfig(
        do_sample=False,
        max_new_tokens=GREEDY_LEN,
        min_new_tokens=0,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=0,
        num_beams=1,
    )
    # generate() refills unset fields from model.generation_config (eos included), so clear it there too.
    saved = (model.generation_config.eos_token_id, model.generation_config.bos_token_id)
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    with torch.no_grad():
        out = model.generate(
            input_ids=prompt[None, :], attention_mask=torch.ones(1, len(prompt), dtype=torch.int64), generation_config=gc
        )
    model.generation_config.eos_token_id, model.generation_config.bos_token_id = saved
    return out[0, len(prompt) :].clone()


def min_gap_abs(model, prompt, ids):
    """Smallest absolute top1 - top2 over the greedy steps (for the printed summary)."""
    seq = torch.cat([prompt, ids])
    with torch.no_grad():
        logits = model(input_ids=seq[None, :], use_cache=False).logits[0]
    steps = logits[len(prompt) - 1 : len(seq) - 1]
    top = torch.topk(steps, 2, dim=-1).values
    return float((top[:, 0] - top[:, 1]).min())


def llama3_check(model, cfg):
    """Print and check that llama3 rope scaling changes some, but not all, inverse frequencies."""
    dh = cfg.head_dim
    plain = 1.0 / (cfg.rope_theta ** (torch.arange(0, dh, 2, dtype=torch.int64).float() / dh))
    scaled = model.model.rotary_emb.inv_freq.float()
    ratio = plain / scaled
    print(f"  llama3 rope: Dh={dh} theta={cfg.rope_theta} scaling={cfg.rope_scaling}")
    print(f"    plain inv_freq : {[f'{v:.4e}' for v in plain.tolist()]}")
    print(f"    scaled inv_freq: {[f'{v:.4e}' for v in scaled.tolist()]}")
    print(f"    plain/scaled   : {[f'{v:.4f}' for v in ratio.tolist()]}")
    factor = cfg.rope_scaling["factor"]
    unchanged = int((ratio - 1).abs().lt(1e-6).sum())
    full = int((ratio - factor).abs().lt(1e-4 * factor).sum())
    between = len(ratio) - unchanged - full
    print(f"    unchanged={unchanged} divided-by-factor={full} smoothed={between}")
    if unchanged == 0 or full == 0 or between == 0:
        sys.exit("llama-f32: llama3 rope scaling does not exercise all three frequency bands")


MODELS = [
    dict(
        name="qwen2-f32",
        cls=Qwen2ForCausalLM,
        seed=1000,
        dtype=torch.float32,
        tokenizer="base",
        cfg=lambda tok_ids: Qwen2Config(
            vocab_size=320,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rope_theta=10000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            bos_token_id=tok_ids["<|endoftext|>"],
            eos_token_id=tok_ids["<|im_end|>"],
            pad_token_id=tok_ids["<|endoftext|>"],
        ),
    ),
    dict(
        name="qwen2-bf16-tied",
        cls=Qwen2ForCausalLM,
        seed=2000,
        dtype=torch.bfloat16,
        tokenizer=None,
        cfg=lambda _: Qwen2Config(
            vocab_size=320,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rope_theta=10000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            bos_token_id=0,
            eos_token_id=1,
        ),
    ),
    dict(
        name="llama-f32",
        cls=LlamaForCausalLM,
        seed=3000,
        dtype=torch.float32,
        tokenizer=None,
        long_prompt=True,
        cfg=lambda _: LlamaConfig(
            vocab_size=320,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=[1, 2],
        ),
    ),
    dict(
        name="llama-bf16-tied",
        cls=LlamaForCausalLM,
        seed=4000,
        dtype=torch.bfloat16,
        tokenizer=None,
        cfg=lambda _: LlamaConfig(
            vocab_size=288,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=512,
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            bos_token_id=0,
            eos_token_id=1,
        ),
    ),
    dict(
        name="thinking-qwen2-f32",
        cls=Qwen2ForCausalLM,
        seed=5000,
        dtype=torch.float32,
        tokenizer="think",
        cfg=lambda tok_ids: Qwen2Config(
            vocab_size=320,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rope_theta=10000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            bos_token_id=tok_ids["<|endoftext|>"],
            eos_token_id=tok_ids["<|im_end|>"],
            pad_token_id=tok_ids["<|endoftext|>"],
        ),
    ),
]

# Prompts for the models with a tokenizer (so the reference ids are real text); others draw ids.
TEXT_PROMPT = "The sum of 3 and 4 is the number"
TEXT_PROMPT2 = "So x is 5."


def make_prompts(spec, cfg, tok, seed):
    g = torch.Generator().manual_seed(seed + 99)
    if tok is not None:
        p1 = torch.tensor(tok.encode(TEXT_PROMPT).ids, dtype=torch.int64)
        p2 = torch.tensor(tok.encode(TEXT_PROMPT2).ids, dtype=torch.int64)
    else:
        p1 = torch.randint(0, cfg.vocab_size, (12,), generator=g, dtype=torch.int64)
        p2 = torch.randint(0, cfg.vocab_size, (7,), generator=g, dtype=torch.int64)
    if not (8 <= len(p1) <= 16) or not (4 <= len(p2) <= 10) or len(p1) == len(p2):
        sys.exit(f"{spec['name']}: prompt lengths {len(p1)}, {len(p2)} outside the intended 8..16 / 4..10")
    long = torch.randint(0, cfg.vocab_size, (LONG_PROMPT_LEN,), generator=g, dtype=torch.int64)
    return p1, p2, long


def build_one(spec, tok, tok_ids, work_dir):
    """Draw weights (reseeding until every greedy step is well separated), save the checkpoint,
    and compute the reference from the reloaded checkpoint. Returns (tensors, summary)."""
    for attempt in range(MAX_RESEEDS):
        seed = spec["seed"] + attempt
        cfg = spec["cfg"](tok_ids)
        torch.manual_seed(seed)  # HF's own init runs first; fixed so the run is deterministic
        model = spec["cls"](cfg)
        init_weights(model, seed)
        model = model.to(spec["dtype"])
        path = os.path.join(work_dir, f"{spec['name']}-{attempt}")
        model.save_pretrained(path, safe_serialization=True)
        ref = load_f32(path, spec["cls"])
        p1, p2, long = make_prompts(spec, cfg, tok, seed)
        g1, w1 = greedy(ref, p1)
        g2, w2 = greedy(ref, p2)
        worst = min(w1, w2)
        distinct = min(len(set(g1.tolist())), len(set(g2.tolist())))
        if worst < 1.0 or distinct < MIN_DISTINCT:
            shutil.rmtree(path)
            continue
        break
    else:
        sys.exit(f"{spec['name']}: no seed in {MAX_RESEEDS} tries gives well-separated greedy steps")

    # KV-cache generate must agree with the full-forward loop.
    for p, g in ((p1, g1), (p2, g2)):
        gen = greedy_generate(ref, p)
        if not torch.equal(gen, g):
            sys.exit(f"{spec['name']}: generate() gave {gen.tolist()}, full-forward greedy gave {g.tolist()}")

    logits, resid = forward_with_resid(ref, p1)
    for name, t in [("logits", logits)] + [(f"resid.{i}", r) for i, r in enumerate(resid)]:
        if not torch.isfinite(t).all():
            sys.exit(f"{spec['name']}: {name} has non-finite values")
    resid_max = [float(r.abs().max()) for r in resid]
    resid_rms = [float(r.pow(2).mean().sqrt()) for r in resid]
    if max(resid_max) > 100.0 or min(resid_rms) < 0.1:
        sys.exit(f"{spec['name']}: residual stream out of the intended O(1)-O(10) range: max {resid_max}, rms {resid_rms}")

    tensors = {
        "prompt_ids": p1,
        "logits": logits,
        "greedy_ids": g1,
        "prompt2_ids": p2,
        "greedy2_ids": g2,
    }
    for i, r in enumerate(resid):
        tensors[f"resid.{i}"] = r
    if spec.get("long_prompt"):
        llama3_check(ref, cfg)
        with torch.no_grad():
            tensors["logits_long_last"] = ref(input_ids=long[None, :], use_cache=False).logits[0, -1].clone()
        tensors["prompt_long_ids"] = long

    summary = dict(
        seed=seed,
        attempts=attempt + 1,
        gap_ratio=worst,
        distinct=distinct,
        min_gap=min(min_gap_abs(ref, p1, g1), min_gap_abs(ref, p2, g2)),
        resid_max=resid_max,
        resid_rms=resid_rms,
        logit_absmax=float(logits.abs().max()),
    )
    return path, tensors, summary


def check_saved(spec, out):
    """The saved weights have the intended dtype and, when tied, no lm_head.weight."""
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    want = "BF16" if spec["dtype"] == torch.bfloat16 else "F32"
    if dtypes != {want}:
        sys.exit(f"{spec['name']}: expected all weights {want}, found {sorted(dtypes)}")
    tied = json.load(open(os.path.join(out, "config.json")))["tie_word_embeddings"]
    if tied == ("lm_head.weight" in keys):
        sys.exit(f"{spec['name']}: tie_word_embeddings={tied} but lm_head.weight present={not tied}")
    return len(keys)


def main():
    if not os.path.isdir("scripts") or not os.path.isfile("Cargo.toml"):
        sys.exit("run from the repo root: python3 scripts/make_fixtures.py")
    torch.set_num_threads(1)  # thread count changes f32 summation order; keep files reproducible
    torch.use_deterministic_algorithms(True)
    os.makedirs(OUT_DIR, exist_ok=True)
    versions = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
    }
    print("versions:", versions)

    merges = train_merges()
    toks = {
        "base": build_tokenizer(merges, BASE_SPECIALS),
        "think": build_tokenizer(merges, BASE_SPECIALS + THINK_TOKENS),
    }
    for k, t in toks.items():
        if t.get_vocab_size(with_added_tokens=True) > 320:
            sys.exit(f"tokenizer {k}: {t.get_vocab_size()} ids, expected <= 320")
    base_vocab = toks["base"].get_vocab(with_added_tokens=True)
    think_vocab = toks["think"].get_vocab(with_added_tokens=True)
    if any(think_vocab.get(k) != v for k, v in base_vocab.items()):
        sys.exit("thinking tokenizer renumbers a base token; the hybrid pair needs shared ids")

    tok_ref = {"info": dict(versions, note="AutoTokenizer.from_pretrained(dir); encode(add_special_tokens=False); decode(ids) with defaults; apply_chat_template([{'role':'user','content':Q}], add_generation_prompt=True)"), "tokenizers": {}}
    summaries = {}
    with tempfile.TemporaryDirectory() as work_dir:
        for spec in MODELS:
            print(f"== {spec['name']}")
            tok = toks.get(spec["tokenizer"]) if spec["tokenizer"] else None
            tok_ids = tok.get_vocab(with_added_tokens=True) if tok else {}
            path, tensors, summary = build_one(spec, tok, tok_ids, work_dir)
            out = os.path.join(OUT_DIR, spec["name"])
            if os.path.isdir(out):
                shutil.rmtree(out)
            shutil.copytree(path, out)
            n_weights = check_saved(spec, out)
            info = {
                **versions,
                "model": spec["name"],
                "seed": summary["seed"],
                "init": f"linear/embedding weights and biases N(0, {INIT_STD}); norm weights U(0.5, 1.5)",
                "how": (
                    "Reference from the saved checkpoint reloaded with from_pretrained(dtype=float32, "
                    "attn_implementation='eager'), CPU, 1 thread: bf16 checkpoints are upcast to f32, so the "
                    "reference is exact f32 arithmetic over bf16-rounded weights. logits: one full forward of "
                    "prompt_ids, every position. resid.L: output of decoder block L via a forward hook on "
                    "model.model.layers[L] (before the final norm). greedy*_ids: argmax of the last position "
                    f"over repeated full forwards, eos ignored, {GREEDY_LEN} tokens, equal to generate(do_sample=False). "
                    f"Every greedy step has top1-top2 >= {GAP_REL}*max(1,|top1|)."
                ),
            }
            if tok is not None:
                info["prompt_text"] = TEXT_PROMPT
                info["prompt2_text"] = TEXT_PROMPT2
            if "logits_long_last" in tensors:
                info["long"] = "logits_long_last: last position of one full forward of prompt_long_ids (T=100 > original_max_position_embeddings=64)"
            tensors = {k: v.contiguous() for k, v in tensors.items()}
            save_file(tensors, os.path.join(out, "reference.safetensors"), metadata={"info": json.dumps(info)})
            if tok is not None:
                specials = BASE_SPECIALS + (THINK_TOKENS if spec["tokenizer"] == "think" else [])
                template = CHAT_TEMPLATE_THINK if spec["tokenizer"] == "think" else CHAT_TEMPLATE_BASE
                write_tokenizer(tok, out, specials, template)
                tok_ref["tokenizers"][spec["name"]] = tokenizer_reference(spec["name"], out)
            summary["n_weights"] = n_weights
            summary["tensors"] = {k: (str(v.dtype).replace("torch.", ""), list(v.shape)) for k, v in tensors.items()}
            summaries[spec["name"]] = summary

    with open(os.path.join(OUT_DIR, "tokenizer_reference.json"), "w") as f:
        json.dump(tok_ref, f, indent=1, ensure_ascii=False)
        f.write("\n")

    print("\n== summary")
    print(f"init std {INIT_STD}; gap rule top1-top2 >= {GAP_REL}*max(1,|top1|)")
    overall = float("inf")
    for name, s in summaries.items():
        overall = min(overall, s["min_gap"])
        print(
            f"{name}: seed {s['seed']} ({s['attempts']} draw(s)), {s['n_weights']} weight tensors, "
            f"min greedy gap {s['min_gap']:.4f} (ratio to required {s['gap_ratio']:.2f}), "
            f"|logits|max {s['logit_absmax']:.2f}, >= {s['distinct']} distinct ids per greedy run"
        )
        print(f"  resid max |x| per layer {[round(v, 2) for v in s['resid_max']]}, rms {[round(v, 2) for v in s['resid_rms']]}")
        for k, (dt, shape) in s["tensors"].items():
            print(f"    {k:18s} {dt:8s} {shape}")
    print(f"minimum greedy top1-top2 gap over all models: {overall:.4f}")
    for name, t in tok_ref["tokenizers"].items():
        print(f"tokenizer {name}: {t['vocab_size_with_added']} ids, added tokens {t['added_tokens']}")
    total = 0
    for root, _, files in os.walk(OUT_DIR):
        total += sum(os.path.getsize(os.path.join(root, fn)) for fn in files)
    print(f"total size of {OUT_DIR}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
