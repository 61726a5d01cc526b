#!/usr/bin/env bash
# Make the project's virtual environment (.venv in the checkout) on first use.
# Reuses a torch that the base interpreter already has (the venv sees the base site-packages);
# installs torch==2.13.0 (a CPU build) only when no torch is installed, so that an unpinned
# requirement never pulls a multi-GB CUDA build.  Usage: scripts/setup_env.sh [VENV_DIR]
set -euo pipefail
venv=${1:-.venv}
base=${PYTHON:-python3}
# DeepSpeed builds its ops (deepspeed_shm_comm on CPU, fused_adam on CUDA) with a C++ compiler at the first
# training launch, into $TORCH_EXTENSIONS_DIR (the Makefile: the venv's torch_extensions/); say so now, not there
if ! command -v "${CXX:-c++}" >/dev/null 2>&1 && ! command -v g++ >/dev/null 2>&1 && ! command -v clang++ >/dev/null 2>&1; then
  echo "setup: no C++ compiler found (\$CXX, c++, g++ or clang++). DeepSpeed builds its deepspeed_shm_comm op with one" >&2
  echo "setup: the first time a training stage starts (about 40 s); install one (e.g. 'sudo apt-get install g++')." >&2
  exit 1
fi
echo "setup: C++ compiler $(command -v "${CXX:-c++}" || command -v g++ || command -v clang++) (DeepSpeed op builds cache in ${TORCH_EXTENSIONS_DIR:-~/.cache/torch_extensions})"
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
