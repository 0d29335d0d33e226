#!/usr/bin/env bash
# One command on a machine with one CUDA GPU (about 5 minutes; under 8): the CUDA tests, then bench.engine on a
# random Phi-3-mini (3.8B) in bf16 built on the GPU: batch-1 decode tokens/s against the memory-bandwidth
# roofline (weight bytes / measured copy bandwidth), and a 64-request continuous batch with its step breakdown.
#   bench/gpu.sh [OUT_DIR]      (default: bench-gpu-out; the table goes to stdout, the rows to OUT_DIR/engine.json)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-gpu-out}"
mkdir -p "$out"
py="${PYTHON:-.venv/bin/python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device visible to torch")'
"$py" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}")'
# the engine on CUDA against HF (fp32 greedy, the tiny checkpoint), plus the CPU tests of the same paths
timeout 300 "$py" -m pytest -q -x -rs tests/test_engine_parity.py tests/test_paged_attention.py
timeout 300 "$py" -m bench.engine --device cuda --requests 64 --json "$out/engine.json"
