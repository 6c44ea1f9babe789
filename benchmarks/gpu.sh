#!/usr/bin/env bash
# The Visium HD benchmarks on a GPU, in one command, from any folder:
#   bash benchmarks/gpu.sh
# Needs a CUDA build of PyTorch in the environment (PYTHON, default .venv/bin/python). Writes
# benchmarks/results/hd_8um_100genes_cuda.* and hd_16um_2000genes_cuda.*; genes per batch are sized from free
# GPU memory (batch_genes: auto).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-$here/../.venv/bin/python}"
cd "$here"
"$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to PyTorch')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$python" hd.py --bin-um 8 --genes 100 --device cuda
"$python" hd.py --bin-um 16 --genes 2000 --device cuda
