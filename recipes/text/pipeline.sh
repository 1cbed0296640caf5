#!/usr/bin/env bash
# Dream's recipe in miniature on the Python standard library, and its baselines, at one budget of 6.29 M training
# tokens each. Run from the repository root: bash recipes/text/pipeline.sh
# On a 2-core CPU the two lanes run side by side, one thread each (about 2 hours in all); see docs/text-model.md.
set -euo pipefail
export OMP_NUM_THREADS=1

dreamlm train-tokenizer runs/text/tokenizer --data stdlib:train --vocab-size 4096   # 4096 BPE + 7 specials

lane_ar() {
  dreamlm train recipes/text/ar-stage.toml                        # 1. AR pretraining, 3.15 M tokens
  dreamlm convert runs/text/ar-stage/final runs/text/ar-stage-dream  # 2. convert: bidirectional, <|mask|> id
  dreamlm train recipes/text/ar2diff.toml                         # 3. diffusion adaptation (CART), 3.15 M tokens
  dreamlm train recipes/text/ar-fim.toml                          # baseline: AR + fill-in-the-middle
}
lane_scratch() {
  dreamlm train recipes/text/diff-scratch.toml                    # baseline: diffusion from scratch, 6.29 M tokens
  until [ -f runs/text/ar-stage/final/config.json ]; do kill -0 "$a" 2>/dev/null || exit 1; sleep 30; done
  dreamlm train recipes/text/ar-full.toml                         # baseline: AR for the whole budget
  dreamlm train recipes/text/split75-ar.toml                      # variant: AR 4.72 M tokens in all ...
  dreamlm convert runs/text/split75-ar/final runs/text/split75-ar-dream
  dreamlm train recipes/text/split75-diff.toml                    # ... then diffusion 1.57 M (75/25 split)
}
lane_ar & a=$!
lane_scratch & b=$!
wait $a && wait $b

dreamlm bench infill --out benchmarks/results                     # the comparison (table, JSON, plot)
