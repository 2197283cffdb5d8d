#!/usr/bin/env bash
# Every GPU figure the open issues still need, in one run on a lent H100/H200 (benchmarks/NOTES.md, "GPU check"):
#   1. training: our compiled step against StableLmForCausalLM at the 1.3B shape (tokens/s, MFU, ratio),
#      peak memory against `crystal plan`, and the loader's share of a real step;
#   2. generation: our KV-cache sampler against transformers' generate at the 1.3B shape, bf16.
#
# Here, once (needs PyPI):  bash benchmarks/device_check.sh --prepare
#   puts the wheels the device image lacks into .whl/ (ignored by git) and checks the tiny recipe's corpus and
#   tokenizer are cached under .cache/crystal-lm.
# There, through the device tool:
#   run(command="bash benchmarks/device_check.sh", timeout_s=580,
#       carry=[".whl", ".cache/crystal-lm/corpus", ".cache/crystal-lm/tokenizers"])
# Rehearsal here, on CPU with small shapes, in an environment like the device's (no ftfy or zstandard):
#   WHEEL_PYTHON=3.11 bash benchmarks/device_check.sh --prepare   # wheels for this machine's Python
#   DEVICE_CHECK_DEVICE=cpu PYTHON=/path/to/that/python bash benchmarks/device_check.sh
# Each part has its own time limit (together with their grace periods, 540 s: under the call's 580), and a part
# that fails does not stop the next. Results go to
# benchmarks/results/ and, with the logs, to $OUT (or /tmp/device_check when OUT is unset).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=(ftfy==6.3.1 wcwidth==0.9.4 zstandard==0.25.0)  # versions of requirements.lock

if [[ "${1:-}" == "--prepare" ]]; then
  set -e
  rm -rf .whl && mkdir -p .whl
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
  ls .whl
  for part in corpus tokenizers; do
    [[ -d .cache/crystal-lm/$part ]] || { echo "missing .cache/crystal-lm/$part: run 'make demo' first" >&2; exit 1; }
  done
  du -sh .whl .cache/crystal-lm/corpus .cache/crystal-lm/tokenizers
  exit 0
fi

OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
touch "$OUT/.start"
export PYTHONUNBUFFERED=1 PYTHONPATH=src HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
for wheel in .whl/*.whl; do  # one at a time: a wheel for another Python is reported, not fatal to the rest
  [[ -e "$wheel" ]] || continue
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheel" \
    || echo "$wheel did not install (made for another Python? run --prepare with WHEEL_PYTHON)" >&2
  export PYTHONPATH=src:/tmp/site
done

part() {  # part NAME SECONDS COMMAND...: runs one part with its limit, logging to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start))s"
  # Results reach $OUT as each part ends: if the whole call is cut short, the parts done still come back.
  find benchmarks/results -name '*.json' -newer "$OUT/.start" -exec cp {} "$OUT"/ \;
}

part env 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; $PY -c \
  'import torch, transformers, crystal_lm.data.build; print(torch.__version__, transformers.__version__, torch.cuda.is_available())'"
if [[ "${DEVICE_CHECK_DEVICE:-cuda}" == cpu ]]; then  # a rehearsal here: same steps, small shapes
  part train 600 $PY benchmarks/train_throughput.py --device cpu --batch 4 --steps 4 --warmup 1 --repeats 1 --with-loader
  part generate 300 $PY benchmarks/generate_throughput.py --new-tokens 16 --repeats 1
else
  part train 330 $PY benchmarks/train_throughput.py --device cuda --shape 1.3b --batch 8 --repeats 2 --with-loader
  part generate 150 $PY benchmarks/generate_throughput.py --shape 1.3b --device cuda --dtype bfloat16 --repeats 2
fi
rm -f "$OUT/.start"
ls -l "$OUT"
