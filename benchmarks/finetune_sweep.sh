#!/bin/bash
# Short-run sweep of the small-budget recipe (docs/finetune.md): 20 steps x 4 x 128 = 10,240 training tokens per run,
# from a converted folder START, one run per setting, each run's held-out perplexity at steps 0, 10 and 20 in
# SWEEP_DIR/<name>-checkpoints/log.jsonl. A rerun skips the runs already done.
#   START=ternary-cal SWEEP_DIR=sweep OMP_NUM_THREADS=1 bash benchmarks/finetune_sweep.sh
# (one OpenMP thread per run: on a shared, oversubscribed CPU two threads made a step ~10x slower)
set -u
START=${START:?set START to a converted folder}
mkdir -p "${SWEEP_DIR:=sweep}" && cd "$SWEEP_DIR"
run() {
  name=$1; shift
  [ -d "$name" ] && { echo "skip $name"; return; }
  echo "=== $name $(date -u +%T) $*"
  bitconvert finetune "$START" --out "$name" --max-steps 20 --seq-len 128 --batch-size 4 --eval-every 10 \
      --save-every 100 --heldout-sequences 16 --quiet "$@" > "$name.log" 2>&1 || echo "failed: see $name.log"
  grep -h heldout_ppl "$name-checkpoints/log.jsonl" | tail -3
}
run kd-lr3e-4                                   # the defaults
run kd-lr1e-3 --lr 1e-3
run kd-lr1e-4 --lr 1e-4
run ce-lr3e-4 --no-distill
run kd-lr3e-4-wd0.1 --weight-decay 0.1
run kd-lr3e-4-tau2 --distill-temperature 2
run kd-lr3e-4-warm5 --lr-warmup-steps 5
