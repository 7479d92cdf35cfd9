#!/usr/bin/env bash
# Reproduce fmnist-resnet18's headline points (see benchmarks/results/rate_accuracy.json, column `cli`)
# under accelerate. CONFIG picks the launch: cpu_1proc.yaml (default), cpu_2proc.yaml, multi_gpu.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-recipes/accelerate/cpu_1proc.yaml}
OUT=${OUT:-outputs/recipes/fmnist-resnet18}
launch() { accelerate launch --config_file "$CONFIG" -m hf_vae_compress compress reference_models/fmnist-resnet18 "$@"; }
# post-hoc headline (VAE transform, 1.0 bit/weight)
launch "$OUT/posthoc" --target-bpw 1.0 --json
# fine-tuned headline: post-hoc at 0.3 bit/weight, then 300 steps of CE + distillation + 0.05 x bits/weight
launch "$OUT/finetuned" --target-bpw 0.3 --finetune-steps 300 --rate-weight 0.05 --checkpoint-dir "$OUT/ckpt" --json
for d in posthoc finetuned; do hf-vae-compress evaluate "$OUT/$d" --dataset fashion_mnist --split test --json; done
