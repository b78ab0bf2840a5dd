#!/usr/bin/env bash
# Stage-1 figures for a GPU machine, printed at the end:
#   1. a training step at the paper's scale (configs/lam/procgen.yaml: batch 128, bf16,
#      torch.compile): windows/s and peak GPU memory (benchmarks/train_step.py);
#   2. the loader's windows/s with 8 workers on generated 64x64 clips, against what the
#      step consumes (benchmarks/loader.py);
#   3. a short Procgen label-efficiency run (experiments/label_efficiency.py procgen) at
#      64x64 with the paper's IDM, and the stage-1 health verdict of its pretraining.
#
#   bash benchmarks/gpu.sh [OUT]                # one GPU (an estimate: 15-45 minutes, mostly part 3)
#   LAPO_BENCH_TINY=1 bash benchmarks/gpu.sh    # tiny sizes on the CPU: checks the script
#   bash benchmarks/gpu.sh --tiny [OUT]         # the same
#   LAPO_BENCH_PARTS="1 2" bash benchmarks/gpu.sh --tiny   # parts 1 and 2 only
#
# Tiny mode on a shared 2-core CPU: parts 1 and 2 take about 20 s; part 3 about 2 minutes,
# nearly all of it the start-up of its nine lapo commands.
# OUT (default /tmp/lapo-gpu-bench) keeps each part's JSON and logs; part 3 resumes when
# rerun with the same OUT. PYTHON picks the interpreter (default: .venv/bin/python).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TINY=${LAPO_BENCH_TINY:-0}
if [[ "${1:-}" == "--tiny" ]]; then
    TINY=1
    shift
fi
OUT=${1:-/tmp/lapo-gpu-bench}
PARTS=${LAPO_BENCH_PARTS:-1 2 3}
PY=${PYTHON:-$ROOT/.venv/bin/python}
[[ -x "$PY" ]] || PY=python
mkdir -p "$OUT"
cd "$ROOT"

if [[ "$TINY" == 1 ]]; then
    mode="tiny (CPU)"
    step=(--config configs/lam/debug.yaml --accelerator cpu --batch 4 --steps 4 --warmup 1)
    loader=(--workers 2 --batch-size 8 --clips 4 --frames 16 --size 32 --naive-windows 10)
    label=(--episodes 2 --budgets 20 --lam-steps 2 --image-size 32 --impala-scale 1
        --idm-epochs 1 --idm-updates 1 --ceiling-epochs 1 --workers 1
        --lam-set trainer.val_every_n_steps=2 data.batch_size=8 data.val_batches=2)
else
    mode="GPU"
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'benchmarks/gpu.sh: torch sees no CUDA device (LAPO_BENCH_TINY=1 runs the CPU check)')"
    step=(--config configs/lam/procgen.yaml --accelerator gpu --batch 128 --steps 30 --warmup 10)
    loader=(--workers 8 --batch-size 128 --clips 1200 --frames 64 --size 64)
    # stage 1 with the paper's IDM and world model (configs/lam/procgen.yaml's sizes)
    label=(--episodes 300 --budgets 100,1000 --lam-steps 3000 --image-size 64 --impala-scale 4
        --workers 8 --lam-set trainer.accelerator=gpu trainer.precision=bf16-mixed
        trainer.compile=true data.batch_size=128 data.num_workers=8 model.embed_dim=256
        model.latent_dim=128 model.vq_heads=8 model.fdm_channels=24 "model.fdm_mults=[1,1,2,5,8,8]")
fi
echo "benchmarks/gpu.sh: $mode, output in $OUT"

# part NAME COMMAND...: run it with its output in OUT/NAME.log; show the log's end on failure
part() {
    local name=$1 t0=$SECONDS
    shift
    "$@" >"$OUT/$name.log" 2>&1 || { tail -n 30 "$OUT/$name.log"; exit 1; }
    echo "   ($name: $((SECONDS - t0)) s; log $OUT/$name.log)"
}

if [[ " $PARTS " == *" 1 "* ]]; then
    echo "== 1. stage-1 training step"
    part train_step "$PY" benchmarks/train_step.py "${step[@]}" --repeats 1 --runs lightning \
        --out "$OUT/train_step" --json "$OUT/train_step.json"
fi
if [[ " $PARTS " == *" 2 "* ]]; then
    echo "== 2. loader"
    part loader "$PY" benchmarks/loader.py "${loader[@]}" --repeats 1 --json "$OUT/loader.json"
fi
if [[ " $PARTS " == *" 3 "* ]]; then
    echo "== 3. Procgen label efficiency"
    part label_efficiency "$PY" experiments/label_efficiency.py procgen --game bigfish \
        --out "$OUT/label_efficiency" "${label[@]}"
fi

echo
echo "== figures ($mode)"
"$PY" - "$OUT" <<'EOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
run = None
if (out / "train_step.json").is_file():
    step = json.loads((out / "train_step.json").read_text())
    run, cfg = step["lightning"], step["config"]
    print(f"stage-1 step: {cfg['path']}, batch {cfg['batch']}, {cfg['precision']}, compile "
          f"{cfg['compile']}: {run['windows_per_s']:.0f} windows/s ({run['step_ms']:.1f} ms a step)")
    if run["peak_gib"] is not None:
        print(f"peak GPU memory: {run['peak_gib']:.2f} GiB (torch.cuda.max_memory_allocated)")
if (out / "loader.json").is_file():
    loader = json.loads((out / "loader.json").read_text())
    stream = loader["(b) lapo loader, training stream"]["windows_per_s"]
    line = f"loader ({loader['workers']} workers, training stream): {stream:.0f} windows/s"
    if run is not None:
        verdict = "keeps up" if stream >= run["windows_per_s"] else "is the bottleneck"
        line += (f"; the step consumes {run['windows_per_s']:.0f}: the loader {verdict} "
                 f"({stream / run['windows_per_s']:.2f}x)")
    print(line)
le = out / "label_efficiency"
if (le / "table.md").is_file():
    print((le / "table.md").read_text().rstrip())
    health = json.loads((le / "lam" / "metrics.json").read_text()).get("health", {})
    print(f"stage-1 health of that run: {health.get('verdict')} {health.get('failed') or ''}")
EOF
