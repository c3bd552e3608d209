#!/bin/bash
# Held-out first-draft acceptance (one draft per round) of the shipped default exit and the
# fused-study exits (runs/drafter_study*/.../exit_N2.safetensors, made by the commands in
# docs/studies.md "Fused exits"): 8 held-out chat + 8 held-out HumanEval prompts, 64 tokens.
set -euo pipefail
out=experiments/results/drafter_study/fused_study_heldout
for ex in shipped runs/drafter_study/tok-55k/exit_N2.safetensors runs/drafter_study_b/fused30-55k/exit_N2.safetensors; do
  for src in chat humaneval; do
    name=$(basename "$(dirname "$ex")")_$src; arg=(--exit "$ex")
    [ "$ex" = shipped ] && name=shipped_$src && arg=()
    eesd bench --prompts $src --split heldout --n 8 --max-new-tokens 64 --tree 0 --controller fixed --max-draft 1 \
      --modes eesd --repeats 1 --by-position --json "${arg[@]}" > $out/$name.json
  done
done
