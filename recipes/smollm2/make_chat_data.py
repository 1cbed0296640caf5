"""Chat SFT data the project makes itself: the AR base (smollm2-ar) answers the training prompts of
dreamlm.chatset from its own chat template (greedy, up to 160 tokens, batched by transformers' generate over the
same weights); answers to checkable prompts are kept only
when right. Writes JSONL {"messages": [user, assistant]} for data.sft_mix.

    python recipes/smollm2/make_chat_data.py runs/smollm2/chat-train.jsonl [--device cuda]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from dreamlm.chatset import chat_prompts, check_answer
from dreamlm.hub import resolve
from dreamlm.model import DreamModel


def hf_causal(model: DreamModel):
    """The same weights as transformers' LlamaForCausalLM (HF names are ours verbatim), for its batched, left-padded
    generate: our ar_generate batches only prompts of one length."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                         rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=True,
                         bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
    hf = LlamaForCausalLM(config)
    missing = hf.load_state_dict(model.state_dict(), strict=False)
    assert not [k for k in missing.missing_keys if "rotary" not in k and k != "lm_head.weight"], missing
    return hf.to(torch.bfloat16).eval()


def main(out: Path, model_dir: str = "smollm2-ar", device: str = "cpu", limit: int = 0, max_new: int = 160,
         batch: int = 64) -> None:
    model = DreamModel.from_pretrained(resolve(model_dir), dtype=torch.float32, causal=True)
    tok = model.tokenizer
    hf = hf_causal(model).to(device)
    prompts = chat_prompts("train")[:limit or None]
    encoded = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p.prompt}])) for p in prompts]
    answers: dict[int, str] = {}
    began = time.time()
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    pad = model.config.pad_token_id
    for start in range(0, len(order), batch):
        chunk = order[start:start + batch]
        width = max(len(encoded[i]) for i in chunk)
        ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i in chunk])
        mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in chunk])
        with torch.no_grad():
            x = hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new, do_sample=False,
                            pad_token_id=pad, eos_token_id=tok.eos_token_id)
        for i, row in zip(chunk, x[:, width:].tolist()):
            if tok.eos_token_id in row:
                row = row[:row.index(tok.eos_token_id)]
            answers[i] = tok.decode(row, skip_special_tokens=True).strip()
        print(f"{len(answers)}/{len(prompts)} answered, {time.time() - began:.0f} s", file=sys.stderr, flush=True)
    kept = 0
    with out.open("w", encoding="utf-8") as fh:
        for i, p in enumerate(prompts):
            a = answers[i]
            if not a or ((p.expect or p.tests) and not check_answer(p, a)):
                continue
            fh.write(json.dumps({"family": p.family, "messages": [{"role": "user", "content": p.prompt},
                                                                  {"role": "assistant", "content": a}]}) + "\n")
            kept += 1
    print(f"kept {kept} of {len(prompts)} answers in {out}", file=sys.stderr)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default="smollm2-ar", help="a causal view of the base (name or folder)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--limit", type=int, default=0, help="answer only the first N prompts (0: all)")
    ap.add_argument("--max-new", type=int, default=160)
    a = ap.parse_args()
    main(a.out, a.model, a.device, a.limit, a.max_new)
