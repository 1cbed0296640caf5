#!/usr/bin/env bash
# Second device round (run from the repo root on the GPU machine, PYTHONPATH=.gpu/src:/tmp/site): the AR base answers
# the chat training prompts (recipes/smollm2/make_chat_data.py), then the LoRA adapter of the first round trains on
# on, with a quarter of every batch those chat answers (Dream-SFT rows) and the rest stdlib code.
#   bash recipes/smollm2/device_continue.sh GGUF INIT_ADAPTER OUT BUDGET_S
set -uo pipefail
gguf=$1; init=$2; out=$3; budget=$4
here=$(dirname "$0")
base=/tmp/smollm2/home/smollm2
python3 -c "from dreamlm.formats.gguf import gguf_to_dream as g; import sys; g(sys.argv[1], sys.argv[2])" "$gguf" "$base" || exit 1
mix=()
if timeout 90 python3 "$here/make_chat_data.py" /tmp/chat.jsonl --model "$base" --device cuda; then
  cp /tmp/chat.jsonl "$out/chat-train.jsonl"
  mix=(--set data.sft_mix=/tmp/chat.jsonl --set data.chat=true)
fi
python3 "$here/device_adapt.py" --gguf "$gguf" --out "$out" --work /tmp/smollm2 --budget "$budget" --runs lora \
  --skip-base-eval --set adapter.init="$init" --set optim.lr=3e-4 --set optim.warmup_steps=20 "${mix[@]}"
