#!/usr/bin/env bash
# The GPU checks of docs/scaling.md, in one go, for a lent GPU machine (`device` tool):
# installs curator, then measures fit and exact score under torchrun on the GPUs there with a
# random-weight SmolLM2-135M (the weights do not travel; the shape does: benchmarks/shapes/).
#
#   bash benchmarks/gpu_scaling.sh            # results in $OUT/gpu_scaling.md (or ./gpu_scaling.md)
set -euo pipefail
out="${OUT:-.}"
python3 -m venv /tmp/gpu-venv
/tmp/gpu-venv/bin/pip install -q torch==2.13.0 2>/dev/null || /tmp/gpu-venv/bin/pip install -q torch
/tmp/gpu-venv/bin/pip install -q -e . 
gpus=$(nvidia-smi --list-gpus | wc -l)
ranks=1
[ "$gpus" -ge 2 ] && ranks="1,$gpus"
/tmp/gpu-venv/bin/python benchmarks/distributed_scaling.py --shape benchmarks/shapes/smollm2-135m \
    --device cuda --dtype bfloat16 --ranks "$ranks" --threads 4 --docs 40 --max-chars 3000 \
    --max-seq-len 512 --layers all --queries 30 --batch-tokens 16384 --chunk-docs 16 \
    --record "$out/gpu_scaling.md"
