#!/usr/bin/env bash
# Build a separate venv for EvalScope (evaluation step). EvalScope 1.14 depends on
# modelscope[datasets], which caps datasets at <=4.8.4 while the training venv pins
# datasets 5.2.0, and it brings litellm and a long tail of packages; so it lives in its own venv
# with the same torch/transformers as training (the local-checkpoint evaluation loads the model
# with transformers there). Usage: ci/evalscope.sh [VENV_DIR]   (default .venv-evalscope)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
VENV=${1:-.venv-evalscope}
PY=${PYTHON:-python3}
EVALSCOPE_VERSION=${EVALSCOPE_VERSION:-1.14.0}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TRANSFORMERS_VERSION=${TRANSFORMERS_VERSION:-5.17.0}
ACCELERATE_VERSION=${ACCELERATE_VERSION:-1.15.0}

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - <<PYEOF 2>/dev/null
import importlib.metadata as m, sys
ok = (m.version("evalscope") == "$EVALSCOPE_VERSION" and m.version("torch").startswith("$TORCH_VERSION")
      and m.version("transformers") == "$TRANSFORMERS_VERSION"
      and m.version("accelerate") == "$ACCELERATE_VERSION")
import evalscope  # noqa: F401
sys.exit(0 if ok else 1)
PYEOF
then
    echo "evalscope venv ready: $VENV"
    exit 0
fi

"$PY" -m venv "$VENV"
"$VENV/bin/pip" install --quiet "torch==$TORCH_VERSION"
"$VENV/bin/pip" install --quiet "evalscope==$EVALSCOPE_VERSION" "torch==$TORCH_VERSION" \
    "transformers==$TRANSFORMERS_VERSION" "accelerate==$ACCELERATE_VERSION" \
    -c "$HERE"/evalscope-constraints.txt
"$VENV/bin/python" -c "import evalscope, torch, transformers; print('evalscope', evalscope.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
