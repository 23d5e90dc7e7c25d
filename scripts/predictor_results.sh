#!/usr/bin/env bash
# Trace the default model, train its predictor, evaluate every predictor on held-out prompts.
#
#   scripts/predictor_results.sh            # everything (single-threaded: ~15 min trace, ~30 min training)
#   STEPS="eval" scripts/predictor_results.sh
#
# Outputs: build/predictor/{prompts.jsonl,trace/}, promoe_gguf/data/default-moe.predictor.pt,
#          bench/results/predictor/{eval,eval-ratio0.5,eval-ratio1}.{json,png,md}
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PROMOE=${PROMOE:-.venv/bin/promoe}
WORK=${WORK:-build/predictor}
PRED=${PRED:-promoe_gguf/data/default-moe.predictor.pt}
OUT=${OUT:-bench/results/predictor}
STEPS=${STEPS:-"prompts trace train eval"}
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$WORK" "$OUT"

for step in $STEPS; do
  case $step in
    prompts)
      $PY scripts/make_prompts.py --train "${N_TRAIN:-720}" --eval "${N_EVAL:-80}" --out "$WORK/prompts.jsonl" ;;
    trace)
      rm -rf "$WORK/trace"
      $PROMOE trace default --prompts "$WORK/prompts.jsonl" --out "$WORK/trace" --decode "${DECODE:-32}" --threads 1 ;;
    train)
      $PROMOE train-predictor "$WORK/trace" --out "$PRED" --model default --threads 1 ${TRAIN_ARGS:-} ;;
    eval)
      $PROMOE eval-predictor default --trace "$WORK/trace" --predictors "gate,mlp:$PRED,history,freq,oracle" \
        --threads 1 --out "$OUT/eval.json" --png "$OUT/eval.png" --markdown "$OUT/eval.md"
      # slower links: one expert's copy takes R x one layer's decode compute
      for R in 0.5 1; do
        $PROMOE eval-predictor default --trace "$WORK/trace" --predictors "gate,mlp:$PRED,history,freq,oracle" \
          --threads 1 --link ratio=$R --layer-time "$(python3 -c "import json;print(json.load(open('$OUT/eval.json'))['setup']['layer_time_s'])")" \
          --out "$OUT/eval-ratio$R.json" --png "$OUT/eval-ratio$R.png" --markdown "$OUT/eval-ratio$R.md"
      done ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
