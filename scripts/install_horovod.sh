#!/bin/sh
# Build and install Horovod 0.28.1 (PyTorch + Gloo, CPU operations over Gloo) into a virtual environment:
#   scripts/install_horovod.sh [VENV]        (default .venv; minutes: it compiles Gloo and the torch extension)
# Two settings make 0.28.1 (the newest release) build against torch 2.13, no source edit:
#  - CMake below 4 (HOROVOD_CMAKE): CMake 4 rejects the bundled Gloo's cmake_minimum_required(VERSION 2.8.12);
#  - every target compiled as C++17 (a CXX wrapper appending -std=c++17): Horovod builds its torch extension with
#    -std=c++14, which torch 2.13's headers refuse (horovod #3996/#4014, fixed on master by #3998, unreleased).
set -eu
VENV=${1:-.venv}
CMAKE=${HOROVOD_CMAKE:-$(command -v cmake || true)}
case "$($CMAKE --version 2>/dev/null | head -1)" in
  "cmake version 3."*) ;;
  *) echo "install_horovod: needs CMake 3.x (found '${CMAKE:-none}'); set HOROVOD_CMAKE=/path/to/cmake-3" >&2; exit 1 ;;
esac
printf '#!/bin/sh\nexec g++ "$@" -std=c++17\n' > "$VENV/cxx17"
chmod +x "$VENV/cxx17"
CXX=$(cd "$VENV" && pwd)/cxx17 HOROVOD_CMAKE=$CMAKE HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 \
HOROVOD_WITHOUT_MPI=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=GLOO \
  "$VENV/bin/python" -m pip install --no-build-isolation --no-cache-dir horovod==0.28.1
"$VENV/bin/python" -c 'import horovod, horovod.torch as hvd; print("horovod", horovod.__version__, "gloo", hvd.gloo_built())'
