#!/usr/bin/env bash
# Everything this project checks on a GPU, in one go (one short lease): the CUDA tests, then the
# GPU figures of the training, sampling and tokenizer benchmarks. Logs and JSON go to $OUT
# (default ./gpu_out); the last lines printed are a summary table.
#
#     bash benchmarks/gpu_checks.sh
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

$PY -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/pytest_gpu.log"

train() {  # name, extra args: maskgil-b, 16x16 tokens, vocab 16384, 1000 classes, bf16
  local name=$1; shift
  timeout 150 $PY benchmarks/bench_train.py --device cuda --precision bf16 --steps 10 --warmup 3 --peak-n 8192 "$@" \
    >"$OUT/train_$name.json" 2>"$OUT/train_$name.err" || echo "bench_train $name failed: $(tail -3 "$OUT/train_$name.err")"
}
train b_bs64 --batch 64
train b_bs256 --batch 256
train b_bs256_compiled --batch 256 --compile --profile  # --compile = train.compile (blocks + loss)
train b_bs512_compiled --batch 512 --compile
train l_bs128_compiled --preset maskgil-l --batch 128 --compile

timeout 120 $PY benchmarks/bench_sampling.py --preset b --device cuda --repeat 3 >"$OUT/sampling_b.json" \
  2>"$OUT/sampling_b.err" || echo "bench_sampling failed: $(tail -3 "$OUT/sampling_b.err")"
timeout 100 $PY benchmarks/bench_tokenizers.py --device cuda --iters 10 --warmup 2 --batch-size 64 \
  >"$OUT/tokenizers.json" 2>"$OUT/tokenizers.err" || echo "bench_tokenizers failed: $(tail -3 "$OUT/tokenizers.err")"

$PY - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for f in sorted(out.glob("train_*.json")):
    try:
        d = json.loads(f.read_text())
    except ValueError:
        continue
    print(f"{f.stem:28s} step {d['best_step_s']*1e3:7.1f} ms  {d['tokens_per_s']:10.0f} tok/s  "
          f"{d['achieved_flops']/1e12:6.1f} TFLOP/s of {d['matmul_peak_flops']/1e12:6.1f}  MFU {d['fraction_of_peak']:.3f}  "
          f"warm-up {d.get('warmup_s', 0):.0f} s  peak mem {d.get('peak_memory_gb') or 0:.1f} GB")
for name in ("sampling_b.json", "tokenizers.json"):
    try:
        d = json.loads((out / name).read_text())
    except (OSError, ValueError):
        continue
    print(name, json.dumps({k: d[k] for k in ("ratios", "forward", "ar_decode") if k in d} or d)[:1500])
PY
