#!/usr/bin/env bash
# The GPU checks, as one short script for a machine with CUDA (about 10 minutes):
# the CUDA tests (the host-sync test has a GPT-2 LoRA fit), then the benchmark and the
# GPT-2-width LoRA benchmark on the GPU. Results go to $OUT (default
# benchmarks/results): cuda.json, cuda.md and lora_gpt2_cuda.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python -m pytest -q -rs tests/test_robustness.py tests/test_host_syncs.py 2>&1 | tail -5
python benchmarks/benchmark.py --device cuda --rounds 2 --warm 2 --name cuda --out "$out"
python benchmarks/lora_gpt2.py --device cuda --rounds 1 --warm 2 --name lora_gpt2_cuda --out "$out"
