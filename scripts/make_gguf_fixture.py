#!/usr/bin/env python3
"""Record what HF transformers computes from the demo GGUF, as the reference for tests/gguf_model.rs.

Run from the repo root, after models/fetch-demo-model.sh, with the pinned versions of
scripts/requirements-fixtures.txt (transformers needs the `gguf` and `accelerate` packages to
read GGUF files):

    python3 scripts/make_gguf_fixture.py

Why: the GGUF converter (src/gguf/) must be checked against a reader nobody on this project wrote.
transformers dequantises the file itself (`from_pretrained(dir, gguf_file=...)`), undoes
llama.cpp's q/k row permutation and rebuilds the tokenizer from `tokenizer.ggml.*`; this script
records its outputs. Everything runs in float32 on one CPU thread, so reruns give the same file.

It (re)writes tests/fixtures/gguf-smollm2/reference.json (compact JSON) holding:

  model             the GGUF file name, its size, versions used
  eos_ids           the eos id list used for generation (tokenizer.ggml.eos_token_id)
  logits            for each prompt: "prompt" (text), "ids" (its token ids, no special tokens
                    added), "vocab_ids" (the recorded vocabulary subset: the union of every
                    position's top-32 ids and 64 fixed ids spread over the vocabulary, sorted),
                    and "values" [T][len(vocab_ids)] the logits at every position, rounded to 1e-5
  greedy            "messages", "prompt_ids" (chat template with the generation prompt, encoded
                    without added special tokens), "new_ids" (greedy continuation, at most 32 new
                    tokens, stopping after an eos id), "text" (new ids without the eos, decoded with
                    special tokens kept and clean_up_tokenization_spaces=False, the tokenizers-level
                    decode), and "min_gap": the smallest top1 - top2 logit gap over the steps
  encodings         [{"text", "ids"}] from the GGUF tokenizer with add_special_tokens=False
  chat              "messages", "add_generation_prompt": true, "text" from apply_chat_template
  special           bos/eos/unk token strings as the HF tokenizer reports them (informational:
                    transformers 4.57's GGUF llama converter swaps bos and eos)
"""

import json
import os
import sys

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "models")
NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = os.path.join(ROOT, "tests", "fixtures", "gguf-smollm2")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "<|im_start|>user\nWhat is 12 * 7? Café ☕ 🙂<|im_end|>\n<|im_start|>assistant\n",
]
GREEDY_MESSAGES = [{"role": "user", "content": "Explain why the sky is blue."}]
MAX_NEW = 32
TOP = 32
FIXED = 64

ENCODE = [
    "Hello, world!",
    "hello world  with   runs of    spaces\tand\ttabs\n\nand newlines\r\n",
    "0123456789 3.14159 1,000,000 12345678901234567890",
    "Ünïcödé: naïve café, Straße, 日本語のテキスト, Ελληνικά, русский",
    "Emoji: 🙂🚀👩‍💻 ✓ ★",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><|im_end|> text <repo_name>x<file_sep>",
    "   leading and trailing spaces   ",
    "don't won't I'm you're it's",
    "",
]
CHAT_MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name a prime."},
    {"role": "assistant", "content": "7"},
    {"role": "user", "content": "Another?"},
]


def main():
    path = os.path.join(MODELS, NAME)
    if not os.path.exists(path):
        sys.exit(f"{path} is missing: run models/fetch-demo-model.sh first")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(MODELS, gguf_file=NAME)
    model = AutoModelForCausalLM.from_pretrained(MODELS, gguf_file=NAME, dtype=torch.float32)
    model.eval()
    vocab = model.config.vocab_size
    fixed = [int(i) for i in np.linspace(0, vocab - 1, FIXED).round()]
    eos_ids = [2]  # tokenizer.ggml.eos_token_id of this file (<|im_end|>)
    assert tok.convert_ids_to_tokens(2) == "<|im_end|>"

    logits_out = []
    with torch.no_grad():
        for text in PROMPTS:
            ids = tok.encode(text, add_special_tokens=False)
            lg = model(torch.tensor([ids])).logits[0].numpy()  # [T, V]
            keep = set(fixed)
            for row in lg:
                keep.update(int(i) for i in np.argsort(-row)[:TOP])
            keep = sorted(keep)
            values = [[round(float(x), 5) for x in row[keep]] for row in lg]
            logits_out.append({"prompt": text, "ids": ids, "vocab_ids": keep, "values": values})

        rendered = tok.apply_chat_template(GREEDY_MESSAGES, tokenize=False, add_generation_prompt=True)
        prompt_ids = tok.encode(rendered, add_special_tokens=False)
        # A plain loop of full forwards (no cache), so each step's top-2 gap is known.
        seq = list(prompt_ids)
        new_ids, min_gap = [], float("inf")
        for _ in range(MAX_NEW):
            last = model(torch.tensor([seq])).logits[0, -1]
            top2 = torch.topk(last, 2)
            min_gap = min(min_gap, float(top2.values[0] - top2.values[1]))
            nxt = int(top2.indices[0])
            new_ids.append(nxt)
            seq.append(nxt)
            if nxt in eos_ids:
                break
        check = model.generate(
            torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=eos_ids,
            pad_token_id=eos_ids[0],
        )[0, len(prompt_ids):].tolist()
        assert check == new_ids, f"generate {check} != loop {new_ids}"
        body = [i for i in new_ids if i not in eos_ids]
        text = tok.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    encodings = [{"text": s, "ids": tok.encode(s, add_special_tokens=False)} for s in ENCODE]
    chat = tok.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)

    ref = {
        "model": {
            "file": NAME,
            "bytes": os.path.getsize(path),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "gguf": __import__("gguf").__version__ if hasattr(__import__("gguf"), "__version__") else "?",
        },
        "eos_ids": eos_ids,
        "logits": logits_out,
        "greedy": {
            "messages": GREEDY_MESSAGES,
            "prompt_ids": prompt_ids,
            "new_ids": new_ids,
            "text": text,
            "min_gap": min_gap,
        },
        "encodings": encodings,
        "chat": {"messages": CHAT_MESSAGES, "add_generation_prompt": True, "text": chat},
        "special": {"bos": tok.bos_token, "eos": tok.eos_token, "unk": tok.unk_token},
    }
    os.makedirs(OUT, exist_ok=True)
    out = os.path.join(OUT, "reference.json")
    with open(out, "w") as f:
        json.dump(ref, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {out} ({os.path.getsize(out)} bytes); greedy: {text!r}; min top-2 gap {min_gap:.4f}")


if __name__ == "__main__":
    main()
