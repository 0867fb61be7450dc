#!/usr/bin/env bash
# Everything this project checks on a GPU, in one go (one short lease): the training benchmark's
# MFU figures for maskgil-b, the CUDA tests, the Ray stages on the GPU (tests/test_gpu_ray.py), more
# training figures, then sampling (compiled AR decoding included) and tokenizer figures. Logs and JSON (with the profile tables) go
# to $OUT (default ./gpu_out); the last lines printed are a summary table.
#
#     bash benchmarks/gpu_checks.sh              # BUDGET=540 s: stages that no longer fit are skipped
#
# Exit status: 1 if any stage that ran failed (a pytest run or a benchmark, timeouts included; they
# are listed at the end), else 0. A stage skipped for lack of time is not a failure.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
# Results of an earlier run must not pass for this one's (a skipped stage leaves no file).
rm -f "$OUT"/train_*.json "$OUT"/train_*.err "$OUT"/sampling_*.json "$OUT"/sampling_*.err \
  "$OUT"/tokenizers.json "$OUT"/tokenizers.err "$OUT"/pytest_*.log "$OUT"/gpu.txt
FAILED=()
failed() {  # stage name: remember it for the exit status and the summary
  FAILED+=("$1")
}
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

# Most important first: one device lease is short. A stage that would not fit in what is left of
# BUDGET seconds is skipped (and says so), so the summary below always prints.
BUDGET=${BUDGET:-540}
fits() {  # seconds a stage may need; true if that much is left
  if (( BUDGET - SECONDS >= $1 )); then return 0; fi
  echo "skipped (needs $1 s, $(( BUDGET - SECONDS )) s left): ${*:2}"; return 1
}
cap() {  # a stage's own time limit, cut to what is left (less 15 s for the summary)
  local r=$(( BUDGET - SECONDS - 15 )); echo $(( $1 < r ? $1 : r ))
}

train() {  # name, extra args: maskgil-b, 16x16 tokens, vocab 16384, 1000 classes, bf16
  local name=$1; shift
  fits 100 "bench_train $name" || return 0
  timeout $(cap 150) $PY benchmarks/bench_train.py --device cuda --precision bf16 --steps 6 --warmup 2 --peak-n 8192 "$@" \
    >"$OUT/train_$name.json" 2>"$OUT/train_$name.err" \
    || { echo "bench_train $name failed: $(tail -3 "$OUT/train_$name.err")"; failed "bench_train $name"; }
}
# The MFU goal: compiled blocks + compiled loss (train.compile), autocast over fp32 weights (fp32
# residual stream) against FSDP2 mixed precision on one rank (bf16 weights and residual stream).
train b_bs256_compiled --batch 256 --compile --profile
train b_bs256_compiled_fsdp --batch 256 --compile --strategy fsdp --profile

# pipefail: the pipeline fails when pytest (or its timeout) does, though `tail` prints the log's end.
if fits 90 "tests/test_gpu.py"; then
  timeout $(cap 240) $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15 \
    || failed "tests/test_gpu.py"
fi
if fits 150 "tests/test_gpu_ray.py"; then
  timeout $(cap 420) $PY -m pytest -q -p no:cacheprovider tests/test_gpu_ray.py 2>&1 | tee "$OUT/pytest_gpu_ray.log" | tail -15 \
    || failed "tests/test_gpu_ray.py"
fi

train b_bs512_compiled_fsdp --batch 512 --compile --strategy fsdp
train l_bs128_compiled --preset maskgil-l --batch 128 --compile
# Sampling: MAR-8 vs AR vs fusion, and the AR decode step, eager and compiled with CUDA graphs
# ("reduce-overhead": inductor's fusion plus graphs; each batch size compiles MAR and AR once).
if fits 120 "bench_sampling"; then
  timeout $(cap 240) $PY benchmarks/bench_sampling.py --preset b --device cuda --repeat 2 \
    --compile-modes reduce-overhead >"$OUT/sampling_b.json" 2>"$OUT/sampling_b.err" \
    || { echo "bench_sampling failed: $(tail -3 "$OUT/sampling_b.err")"; failed "bench_sampling"; }
fi
train b_bs256_eager --batch 256

if fits 40 "bench_tokenizers"; then
  timeout $(cap 100) $PY benchmarks/bench_tokenizers.py --device cuda --iters 10 --warmup 2 --batch-size 64 \
    >"$OUT/tokenizers.json" 2>"$OUT/tokenizers.err" \
    || { echo "bench_tokenizers failed: $(tail -3 "$OUT/tokenizers.err")"; failed "bench_tokenizers"; }
fi
echo "gpu_checks: ${SECONDS} s"

$PY - "$OUT" <<'PY' || failed "summary"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for f in sorted(out.glob("train_*.json")):
    try:
        d = json.loads(f.read_text())
    except ValueError:
        continue
    print(f"{f.stem:30s} step {d['best_step_s']*1e3:7.1f} ms  {d['tokens_per_s']:10.0f} tok/s  "
          f"{d['achieved_flops']/1e12:6.1f} TFLOP/s of {d['matmul_peak_flops']/1e12:6.1f}  MFU {d['fraction_of_peak']:.3f}  "
          f"warm-up {d.get('warmup_s', 0):.0f} s  peak mem {d.get('peak_memory_gb') or 0:.1f} GB")
    if d.get("profile"):
        pr = d["profile"]
        print(f"    profiled: {pr['wall_s_per_step']*1e3:.1f} ms/step, device busy {pr['device_busy_fraction'] or 0:.0%}; top: "
              + "; ".join(f"{t['op'][:40]} {t['ms_per_step']:.1f} ms" for t in pr["top"][:6]))
for name in ("sampling_b.json", "tokenizers.json"):
    try:
        d = json.loads((out / name).read_text())
    except (OSError, ValueError):
        continue
    print(name, json.dumps({k: d[k] for k in ("ratios", "forward", "ar_decode") if k in d} or d)[:1500])
PY
if (( ${#FAILED[@]} )); then
  echo "gpu_checks: FAILED stages (${#FAILED[@]}): ${FAILED[*]}"
  exit 1
fi
echo "gpu_checks: every stage that ran passed"
