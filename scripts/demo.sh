#!/usr/bin/env bash
# The README's first command: builds thinksteer and runs the hybrid loop on the bundled tiny pair
# (qwen2-f32 as base, thinking-qwen2-f32 as thinking model) with a random SAE and random vectors.
# The models are random, so the text is noise: this shows the mechanics, not the paper's gains.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin thinksteer
B=target/release/thinksteer
T=$(mktemp -d)
$B random-sae --model tests/fixtures/thinking-qwen2-f32 --layer 2 --latents 4 --seed 1 --out "$T/sae.safetensors"
$B random-vectors --model tests/fixtures/qwen2-f32 --layer 1 --count 4 --norm 12 --seed 2 --out "$T/vectors.safetensors"
$B hybrid --base tests/fixtures/qwen2-f32 --thinking tests/fixtures/thinking-qwen2-f32 \
    --sae "$T/sae.safetensors" --vectors "$T/vectors.safetensors" \
    --question "Natalia sold clips to 48 of her friends in April. How many clips did she sell?" \
    --max-new-tokens 24 --device cpu --json
