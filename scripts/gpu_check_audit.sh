#!/usr/bin/env bash
# GPU check of robkd audit (with certification and --resume), certification and robkd repair on CUDA
# against the CPU run (scripts/gpu_check_audit.py says what is compared); figures go to
# reports/gpu_check_audit.json. Run on a machine with a CUDA GPU and the repository's .venv; exits 2
# when CUDA is not visible rather than passing vacuously. Smoke run without a GPU:
#   scripts/gpu_check_audit.sh --smoke --device cpu --out /tmp/gpu_check_audit.json
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec .venv/bin/python scripts/gpu_check_audit.py "$@"
