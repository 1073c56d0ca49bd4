#!/usr/bin/env bash
# GPU check of training on CUDA (robkd train/repair --device cuda) against the CPU run:
# kdiga, ard, trades and fast-ard for a few steps (same seed: losses within 1e-3 relative),
# CUDA-saved checkpoints that load on the CPU, and a CUDA-saved state resumed on the CPU.
# Run on a machine with a CUDA GPU and the repository's .venv; the tests skip without CUDA,
# so this script fails (exit 1) when CUDA is not visible rather than passing vacuously.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
.venv/bin/python -c 'import sys, torch; ok = torch.cuda.is_available(); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", ok, torch.cuda.get_device_name(0) if ok else ""); sys.exit(0 if ok else 1)'
exec .venv/bin/python -m pytest -q tests/test_train_device.py -p no:cacheprovider "$@"
