#!/usr/bin/env bash
# The GPU end-to-end study (configs/gpu-e2e.yaml) on one GPU machine, from the repository root:
#
#   OUT=/some/folder [E2E_CONFIG=configs/gpu-e2e.yaml] bash benchmarks/gpu_e2e.sh [targets and snakemake args]
#   (default targets: all results/q7/sft-lora/adapter)
#
# Installs carried wheels from .whl/ into /tmp/site when that folder is there (a machine without the
# training extras; see docs/gpu-e2e.md), records versions and the GPU, samples GPU memory every 0.25 s
# while Snakemake runs, then packs what the table needs (logs, benchmark TSVs, every small JSON) into
# $OUT. benchmarks/gpu_e2e_table.py turns that into the stage table. A rerun resumes (Snakemake
# skips finished jobs). SNAKETUNE_E2E_LIMIT bounds Snakemake's wall time (seconds, default 520).
# E2E_VERIFY="BUNDLE [TARGET ...]" then re-runs the bundle with `snaketune.bundle verify` on the same GPU.
# The re-run needs the study's disk again (configs/gpu-e2e.yaml: 26 GB; an H100 machine has ~64 GB
# free) and about 6.5 minutes: verify in the next call (2026-12-06-h100-e2e-verify-2.md).
set -u
OUT=${OUT:?set OUT to a folder for the logs}
mkdir -p "$OUT"
if [ -d .whl ] && [ ! -f /tmp/site/.done ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && touch /tmp/site/.done || exit 1
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONPATH=$PWD/scripts:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{
    date -u; uname -a; nproc; free -g; df -h . /tmp
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
    python3 - <<'EOF'
from importlib import metadata
for name in ("torch", "transformers", "accelerate", "peft", "trl", "datasets", "tokenizers", "safetensors",
             "llmcompressor", "compressed-tensors", "mlflow-skinny", "snakemake", "triton", "numpy"):
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "missing")
EOF
    python3 -c "import snakemake, mlflow, trl, peft, datasets, llmcompressor, compressed_tensors, snaketune; print('imports ok')"
} > "$OUT/env.txt" 2>&1
tail -3 "$OUT/env.txt"

nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader,nounits -lms 250 >> "$OUT/gpumem.csv" &
SAMPLER=$!
[ -f results/gpu-e2e-data/chat.jsonl ] || python3 benchmarks/gpu_e2e_data.py --out results/gpu-e2e-data/chat.jsonl
echo "start $(date -u +%FT%T)" >> "$OUT/snakemake.log"
[ $# -gt 0 ] || set -- all results/q7/sft-lora/adapter
timeout -s INT -k 30 "${SNAKETUNE_E2E_LIMIT:-520}" python3 -m snakemake "$@" --profile profiles/local --cores 16 \
    --keep-going --configfile "${E2E_CONFIG:-configs/gpu-e2e.yaml}" 2>&1 | tee -a "$OUT/snakemake.log"
echo "end $(date -u +%FT%T) rc ${PIPESTATUS[0]}" | tee -a "$OUT/snakemake.log"
kill "$SAMPLER"

du -sh results/*/*/* results/*/*/*/* 2>/dev/null | sort -h | tail -30 > "$OUT/du.txt"; df -h . >> "$OUT/du.txt"
find results -name '*.json' -size -4M -not -path 'results/cache/*' > /tmp/e2e-files
find results/logs results/benchmarks results/summary.md results/report -type f -size -4M >> /tmp/e2e-files 2>/dev/null
tar czf "$OUT/results.tgz" -T /tmp/e2e-files 2>/dev/null
if [ -n "${E2E_VERIFY:-}" ]; then
    set -- $E2E_VERIFY
    bundle=$1; shift
    start=$(date +%s)
    python3 -m snaketune.bundle verify "$bundle" --run-bundle-code --cores 16 --workdir /tmp/e2e-verify \
        ${1:+--targets "$@"} 2>&1 | tee "$OUT/verify.log"
    echo "verify rc ${PIPESTATUS[0]} in $(( $(date +%s) - start )) s" | tee -a "$OUT/verify.log"
    cp "$bundle" "$OUT/" 2>/dev/null
fi
ls -la "$OUT"
