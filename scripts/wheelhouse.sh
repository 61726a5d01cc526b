#!/usr/bin/env bash
# Build an offline wheelhouse for a GPU host that has PyTorch, transformers, accelerate and
# tensorboard but no package index (Python 3.12, x86-64). Usage, from the project root:
#   scripts/wheelhouse.sh [DIR]        (DIR defaults to .whl; keep it git-ignored)
# Install on the GPU host with:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl && export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
# DeepSpeed ships as a source archive; it is built here as a pure-Python wheel (its CUDA ops are
# compiled just-in-time on the GPU host, which needs nvcc and ninja; set TORCH_CUDA_ARCH_LIST=9.0 on H100/H200,
# otherwise DeepSpeed 0.19.x fails to parse the arch list while building FusedAdam).
set -euo pipefail
dir=${1:-.whl}
mkdir -p "$dir"
DS_VERSION=${DS_VERSION:-$(python3 -c 'from importlib.metadata import version; print(version("deepspeed"))' 2>/dev/null || echo 0.19.8)}
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w "$dir" "deepspeed==$DS_VERSION" 2>/dev/null \
  || DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w "$dir" "deepspeed==$DS_VERSION"
plat="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
# deepspeed needs hjson and pydantic v2, which that image lacks; torch-pruning is pure Python.
python3 -m pip download -q --no-deps $plat -d "$dir" hjson "pydantic>=2,<3" pydantic-core annotated-types typing-inspection torch-pruning ${EXTRA_WHEELS:-}
# pydantic pins one exact pydantic-core: keep only the matching one.
python3 - "$dir" <<'PY'
import sys, pathlib, zipfile, re
d = pathlib.Path(sys.argv[1])
pyd = sorted(d.glob("pydantic-2*.whl"))[-1]
meta = zipfile.ZipFile(pyd).read(next(n for n in zipfile.ZipFile(pyd).namelist() if n.endswith("METADATA"))).decode()
want = re.search(r"Requires-Dist: pydantic-core==([\w.]+)", meta).group(1)
for w in d.glob("pydantic_core-*.whl"):
    if f"pydantic_core-{want}-" not in w.name:
        w.unlink()
print("wheelhouse:", ", ".join(sorted(p.name.split("-")[0] + "-" + p.name.split("-")[1] for p in d.glob("*.whl"))))
PY
du -sh "$dir"
