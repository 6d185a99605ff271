#!/usr/bin/env bash
# Teacher and student throughput on a lent GPU (H100/H200): a ~1.4 B random-initialised Idefics2
# (text: hidden 2048, 16 layers, GQA 16/8, MLP 8192; vision: 768 x 12 layers, 224 px) in bf16.
# Prints tokens/s and model FLOPs utilisation (MFU) for: the teacher's bare forward, the teacher with
# capture + store (the stage's loop), and the student's step (Student + MimIC heads, DeepSpeed ZeRO).
# Finishes in about 2-3 minutes (3 x 30 s of timing plus set-up); a hard limit of 280 s is set below.
#
# The GPU machine has no network, PyTorch and transformers, and at most 64 MiB of carried files.
# Everything else the stages import comes as wheels in $WHEELS (default bench/wheels), made here with:
#   .venv/bin/pip download --no-deps -d bench/wheels zarr==3.1.6 numcodecs==0.16.6 donfig google-crc32c \
#       pillow pyyaml deepspeed==0.19.8 hjson msgpack ninja py-cpuinfo einops psutil pydantic pydantic-core \
#       annotated-types typing-inspection
#   (deepspeed is an sdist on PyPI: `.venv/bin/pip wheel --no-deps -w bench/wheels deepspeed==0.19.8`.)
# Without deepspeed the script falls back to a plain model and torch AdamW and says so.
# pyarrow (~40 MB) is not carried: only the hf-* tasks import it (inside their loaders), and no benchmark uses them.
#
# Then P6 (bench/p6_realwidth.py, issue 19): the student's data path at real width (32 x 4096, bf16) on this
# machine's disk and cores: reader vs plain read, and the data wait per step at simulated 40/100 ms steps, with
# micro-batches moved to the GPU, 2 epochs through one prefetch. P6_GB sets its store's size (default 8 GB; it is
# written, measured and deleted, about 3 minutes); ONLY=p6 runs P6 alone, ONLY=models the model benchmark alone.
#
#   bash bench/gpu.sh                  # from the repo root on the GPU machine
#   WHEELS=/path/to/wheels PEAK_TFLOPS=989 bash bench/gpu.sh
#   ONLY=p6 P6_GB=0.2 bash bench/gpu.sh   # P6 alone on a small store (a check of the script, on any machine)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-bench/wheels}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

missing=$($PY - <<'PY'
import importlib.util
need = {"zarr": "zarr", "numcodecs": "numcodecs", "donfig": "donfig", "google_crc32c": "google-crc32c",
        "PIL": "pillow", "yaml": "pyyaml", "deepspeed": "deepspeed"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
PY
)
if [ -n "$missing" ]; then
  echo "installing from $WHEELS: $missing"
  if [ -d "$WHEELS" ]; then
    $PY -m pip install --quiet --no-index --find-links "$WHEELS" --target /tmp/mimic-gpu-site $missing \
      || echo "some wheels missing in $WHEELS; continuing with what imports"
    export PYTHONPATH="$PYTHONPATH:/tmp/mimic-gpu-site"
  else
    echo "no wheel directory $WHEELS; continuing with what imports"
  fi
fi

if [ "${ONLY:-}" != "p6" ]; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
  timeout 280 $PY bench/gpu_bench.py "$@" || echo "bench/gpu_bench.py failed ($?)"
fi
if [ "${ONLY:-}" != "models" ]; then
  timeout 400 $PY -m bench.p6_realwidth --gb "${P6_GB:-8}" --epochs 2  # 2 epochs of ~90 steps: within the limit
fi
