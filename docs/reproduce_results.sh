#!/usr/bin/env bash
# Reruns the training runs behind RESULTS.md's figures into docs/runs/<name>/ (TensorBoard events, config.json,
# train.log) and draws the figures from them into docs/*.png. Run it from anywhere, on a GPU machine:
#
#   pip install -e '.[cuda13,plots]'
#   GPUS=0,1,2,3 bash docs/reproduce_results.sh    # 4 GPUs: one run per GPU at a time, about 7 minutes on H200s
#   bash docs/reproduce_results.sh                 # one GPU: the runs one after another, about 30 minutes
#
# Every knob below is an environment variable; the defaults are RESULTS.md's runs. tests/docs_test.py runs a
# miniature of this script on CPU (a tiny model, a few steps, DEST in a temporary folder). Checkpoints stay under
# docs/runs/*/checkpoints (git ignores them): rerunning the script on finished runs only evaluates them again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DEST=${DEST:-docs}                        # runs go to $DEST/runs/<name>, figures to $DEST/<figure>.png
GPUS=${GPUS:-}                            # GPU ids to spread the runs over, one run per GPU ('' = one at a time)
DEVICE=${DEVICE:-H200}                    # named in the figure titles
STEPS=${STEPS:-200000}                    # section 1: the original's experiment
EVAL_EVERY=${EVAL_EVERY:-10000}
BLOCKWISE_STEPS=${BLOCKWISE_STEPS:-10000}  # section 2: blockwise training next to the factored run
BLOCKWISE_EVAL=${BLOCKWISE_EVAL:-2500}
CHECK_STEPS=${CHECK_STEPS:-50000}         # section 2: one checkpoint evaluated under every implementation
MLP_STEPS=${MLP_STEPS:-3000}              # section 4: the MLP K/V generator against the linear one
MLP_EVAL=${MLP_EVAL:-1000}
EXTRA=${EXTRA:-}                          # flags added last to every run (the CPU miniature shrinks the model)

PYTHON=${PYTHON:-python}  # the interpreter selattn is installed for (e.g. PYTHON=python3 where there is no python)
"$PYTHON" -c "import selattn.main" 2>/dev/null || {
  echo "[reproduce] $PYTHON cannot import selattn.main: set PYTHON to the interpreter of its environment" >&2
  exit 2
}
R=$DEST/runs
read -r -a extra <<< "$EXTRA"

train() {  # NAME FLAGS...: one run of selattn.main into $R/NAME (its log: $R/NAME/train.log, its output: output.log)
  local name=$1
  shift
  # The runs of 2026-11-27 predate train.flat_optimizer (the original's configs now turn it on): the same
  # arithmetic, in another order.
  set -- "$@" --config.train.flat_optimizer=False --workdir "$R/$name" "${extra[@]}"
  mkdir -p "$R/$name"
  echo "[reproduce] $name: python -m selattn.main $*"
  # The run writes its log lines to train.log itself; its console (them again, and a crash's traceback) goes here.
  "$PYTHON" -m selattn.main "$@" >> "$R/$name/output.log" 2>&1 \
    || { echo "[reproduce] $name failed; the end of $R/$name/output.log:" >&2; tail -n 20 "$R/$name/output.log" >&2; return 1; }
}

checkpoint_under_every_impl() {  # a factored run, then its last checkpoint evaluated by blockwise and materialized
  train selective_50k --config configs/selective.py --config.train.num_steps="$CHECK_STEPS"
  local impl
  for impl in blockwise materialized; do
    # A run already at train.num_steps only evaluates; selective_impl may change (same parameters).
    train selective_50k --config configs/selective.py --config.train.num_steps="$CHECK_STEPS" \
      --config.model.selective_impl=$impl
  done
}

JOBS=(
  "train original_200k/standard --config configs/standard.py --config.train.num_steps=$STEPS --config.train.eval_every=$EVAL_EVERY"
  "train original_200k/selective --config configs/selective.py --config.train.num_steps=$STEPS --config.train.eval_every=$EVAL_EVERY"
  "train original_200k/reference --config configs/reference.py --config.train.num_steps=$STEPS --config.train.eval_every=$EVAL_EVERY"
  "train original_200k/standard_ffn5 --config configs/standard.py --config.model.ffn_mult=5 --config.train.num_steps=$STEPS --config.train.eval_every=$EVAL_EVERY"
  "train identity_and_mlp/sel_mlp --config configs/selective.py --config.model.kv_generator=mlp --config.model.kv_hidden=64 --config.train.num_steps=$MLP_STEPS --config.train.eval_every=$MLP_EVAL"
  "train identity_and_mlp/sel_blockwise --config configs/selective.py --config.model.selective_impl=blockwise --config.model.block_q=320 --config.model.block_k=320 --config.train.num_steps=$BLOCKWISE_STEPS --config.train.eval_every=$BLOCKWISE_EVAL"
  "checkpoint_under_every_impl"
  "train identity_and_mlp/sel_linear_3k --config configs/selective.py --config.train.num_steps=$MLP_STEPS --config.train.eval_every=$MLP_EVAL"
)

if [[ -z $GPUS ]]; then
  for job in "${JOBS[@]}"; do
    eval "$job"
  done
else
  # A pool of GPUs: each job runs alone on one (CUDA_VISIBLE_DEVICES); the next one waits for a free GPU.
  IFS=, read -r -a free <<< "$GPUS"
  declare -A gpu_of=()
  failed=0
  reap() {
    local pid
    wait -n -p pid || failed=1
    free+=("${gpu_of[$pid]}")
    unset "gpu_of[$pid]"
  }
  for job in "${JOBS[@]}"; do
    while (( ${#free[@]} == 0 )); do reap; done
    gpu=${free[0]}
    free=("${free[@]:1}")
    CUDA_VISIBLE_DEVICES=$gpu eval "$job" &
    gpu_of[$!]=$gpu
  done
  while (( ${#gpu_of[@]} > 0 )); do reap; done
  (( failed == 0 )) || { echo '[reproduce] a run failed (its log tail is above)' >&2; exit 1; }
fi

"$PYTHON" -m selattn.plot "$R"/original_200k/{standard,standard_ffn5,selective,reference} --smoothing 0.95 \
  --labels 'standard (192k params),standard F=5D (225k),selective (225k),reference (208k)' \
  --title "original config, $((STEPS / 1000))k steps, one $DEVICE each" --out "$DEST/original_200k.png"
"$PYTHON" -m selattn.plot "$R"/original_200k/selective "$R"/identity_and_mlp/sel_blockwise --max_step "$BLOCKWISE_STEPS" \
  --tags train/loss,eval/loss --labels 'factored (the identity),blockwise (literal [q_i;x_j] tiles)' \
  --title "selective, original config: two computations of one function ($DEVICE)" \
  --out "$DEST/identity_blockwise_vs_factored.png"
"$PYTHON" -m selattn.plot "$R"/identity_and_mlp/{sel_linear_3k,sel_mlp} --tags train/loss,eval/loss \
  --labels 'linear generator (224.7k params),mlp generator kv_hidden=64 (225.5k)' \
  --title "selective K/V generator, original config, $MLP_STEPS steps ($DEVICE)" --out "$DEST/mlp_vs_linear.png"
