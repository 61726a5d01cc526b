#!/usr/bin/env bash
# Make the project's virtual environment (.venv in the checkout) on first use.
# Reuses a torch that the base interpreter already has (the venv sees the base site-packages);
# installs torch==2.13.0 (a CPU build) only when no torch is installed, so that an unpinned
# requirement never pulls a multi-GB CUDA build.  Usage: scripts/setup_env.sh [VENV_DIR]
set -euo pipefail
venv=${1:-.venv}
base=${PYTHON:-python3}
if "$base" -c "import torch" >/dev/null 2>&1; then
  echo "setup: reusing torch $("$base" -c 'import torch; print(torch.__version__)') from $base"
  "$base" -m venv --system-site-packages "$venv"
else
  "$base" -m venv "$venv"
  echo "setup: no torch installed; installing torch==2.13.0"
  "$venv/bin/python" -m pip install -q torch==2.13.0
fi
"$venv/bin/python" -m pip install -q -e '.[dev]'
"$venv/bin/python" -c "import torch, deepspeed, transformers, accelerate, torch_pruning; print('setup: torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)" 2>&1 | grep -v "accelerator to"
touch "$venv/.installed"
