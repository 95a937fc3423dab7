#!/usr/bin/env bash
# Reruns the seeded experiments of RESULTS.md (each a `python -m selattn.sweep` folder of seed<k>/ runs under
# $DEST/runs/seeds/) and draws their figures (mean over seeds, min-max band) into $DEST/*.png. From anywhere, on a
# GPU machine:
#
#   pip install -e '.[cuda13,plots]'
#   python -m selattn.corpora.fetch tinyshakespeare     # the nanoGPT part reads data/tinyshakespeare.txt
#   bash docs/reproduce_seeds.sh                        # every part, every GPU nvidia-smi lists
#   PARTS=nanogpt GPUS=0 bash docs/reproduce_seeds.sh   # one part, one GPU
#
# The parts ($PARTS, space-separated):
#   original  the original config at $STEPS steps, $SEEDS seeds each: standard, standard F=5D, selective, and the
#             two ablations the identity makes possible (model.selective_parts=values: standard keys plus the
#             per-query value term; =keys: the augmented keys only, values from x_j alone). Each sweep's seeds
#             train stacked in one process (selattn.sweep --stack) on one GPU: the sweeps' first GPUs differ
#   pre       the original config with pre-layer norm, standard and selective, one seed each
#   nanogpt   configs/nanogpt.py (nanoGPT's model and recipe) standard and :selective, $SEEDS seeds each
# The sweeps of one part run at the same time, the unstacked ones $PER_GPU runs on each GPU; the parts run one
# after another. Every run resumes from its latest checkpoint: after a crash or a time limit, rerun the same
# command. Each sweep's summary (best and last held-out loss per seed, mean, std, min, max) is in its
# summary.json. tests/docs_test.py runs a miniature on CPU (marked slow).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DEST=${DEST:-docs}                     # sweeps go to $DEST/runs/seeds/<part>/<name>, figures to $DEST/<part>_*.png
PARTS=${PARTS:-original pre nanogpt}
GPUS=${GPUS:-auto}                     # comma-separated GPU ids, 'auto' (every GPU) or 'none' (CPU)
PER_GPU=${PER_GPU:-6}                  # runs at a time on each GPU, over all sweeps of a part
SEEDS=${SEEDS:-3}
DEVICE=${DEVICE:-H200}                 # named in the figure titles
STEPS=${STEPS:-200000}                 # the original config's runs
EVAL_EVERY=${EVAL_EVERY:-10000}
NANOGPT_STEPS=${NANOGPT_STEPS:-5000}        # its schedule ends at 5000 (train.lr_decay_steps) whatever this is: 2000 gives the same curve
NANOGPT_BEST_UNTIL=${NANOGPT_BEST_UNTIL:-2000}  # nanoGPT's own benchmark: the best validation loss by step 2000
EXTRA=${EXTRA:-}                       # flags added last to every run (the CPU miniature shrinks the models)

PYTHON=${PYTHON:-python}  # the interpreter selattn is installed for (e.g. PYTHON=python3 where there is no python)
"$PYTHON" -c "import selattn.main" 2>/dev/null || {
  echo "[seeds] $PYTHON cannot import selattn.main: set PYTHON to the interpreter of its environment" >&2
  exit 2
}
R=$DEST/runs/seeds
read -r -a extra <<< "$EXTRA"
read -r -a parts <<< "$PARTS"
if [[ $GPUS == auto ]]; then
  GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  GPUS=$( ((GPUS > 0)) && seq -s, 0 $((GPUS - 1)) || echo none)
fi
# Runs of a part share the GPUs: memory is taken as needed (not 90% of a GPU per process), each capped at its share.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

sweeps=()  # one entry per sweep of the part: "NAME SEEDS FLAGS..."

run_part() {  # PART: its sweeps at the same time, the GPU list rotated so that first seeds spread over the GPUs
  local i=0 pids=() failed=0 gpus name seeds per_gpu
  for spec in "${sweeps[@]}"; do
    read -r -a args <<< "$spec"
    name=${args[0]} seeds=${args[1]}
    gpus=$GPUS
    if [[ $GPUS != none ]]; then
      IFS=, read -r -a ids <<< "$GPUS"
      local k=$((i % ${#ids[@]}))
      gpus=$(IFS=,; echo "${ids[*]:k} ${ids[*]:0:k}" | tr ' ' , | sed 's/,$//')
    fi
    mkdir -p "$R/$1/$name"
    echo "[seeds] $1/$name: python -m selattn.sweep --workdir $R/$1/$name --seeds $seeds ${args[*]:2} ${extra[*]}"
    per_gpu=(--per_gpu "$PER_GPU")
    # A stacked sweep: one process holding all its seeds, on the sweep's first GPU (sweep --stack would deal the
    # seeds over every GPU it is given, one process per GPU).
    [[ " ${args[*]} " == *" --stack "* ]] && per_gpu=() && gpus=${gpus%%,*}
    "$PYTHON" -m selattn.sweep --workdir "$R/$1/$name" --seeds "$seeds" --gpus "$gpus" "${per_gpu[@]}" \
      "${args[@]:2}" "${extra[@]}" > "$R/$1/$name/sweep.log" 2>&1 &
    pids+=($!)
    i=$((i + 1))
  done
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  for spec in "${sweeps[@]}"; do
    read -r -a args <<< "$spec"
    echo "[seeds] $1/${args[0]}:"
    tail -n 8 "$R/$1/${args[0]}/sweep.log"
  done
  ((failed == 0)) || { echo "[seeds] a sweep of part $1 failed (its sweep.log says why, naming the failed run's output file)" >&2; exit 1; }
}

original="--config.train.num_steps=$STEPS --config.train.eval_every=$EVAL_EVERY"
for part in "${parts[@]}"; do
  case $part in
    original)
      sweeps=(
        "standard $SEEDS --config configs/standard.py $original --stack"
        "standard_ffn5 $SEEDS --config configs/standard.py --config.model.ffn_mult=5 $original --stack"
        "selective $SEEDS --config configs/selective.py $original --stack"
        "values_only $SEEDS --config configs/selective.py --config.model.selective_parts=values $original --stack"
        "keys_only $SEEDS --config configs/selective.py --config.model.selective_parts=keys $original --stack"
      )
      run_part original
      "$PYTHON" -m selattn.plot "$R"/original/{standard,standard_ffn5,selective,values_only,keys_only} \
        --smoothing 0.95 --tags train/loss,eval/loss \
        --labels 'standard,standard F=5D,selective,values only (standard keys + C q_i),keys only (V from x_j)' \
        --title "original config, $((STEPS / 1000))k steps, $SEEDS seeds (mean, min-max), $DEVICE" \
        --out "$DEST/seeds_original.png"
      ;;
    pre)
      sweeps=(
        "standard 1 --config configs/standard.py --config.model.norm=pre $original"
        "selective 1 --config configs/selective.py --config.model.norm=pre $original"
      )
      run_part pre
      "$PYTHON" -m selattn.plot "$R"/pre/{standard,selective} --smoothing 0.95 --tags train/loss,eval/loss \
        --labels 'standard (pre-LN),selective (pre-LN)' \
        --title "original config with pre-layer norm, $((STEPS / 1000))k steps, $DEVICE" --out "$DEST/seeds_pre.png"
      ;;
    nanogpt)
      nano="--config.train.num_steps=$NANOGPT_STEPS --best_until $NANOGPT_BEST_UNTIL"
      sweeps=(
        "standard $SEEDS --config configs/nanogpt.py $nano"
        "selective $SEEDS --config configs/nanogpt.py:selective $nano"
      )
      run_part nanogpt
      "$PYTHON" -m selattn.plot "$R"/nanogpt/{standard,selective} --tags train/loss,eval/loss \
        --labels 'standard (nanoGPT block),selective (same block)' \
        --title "nanoGPT shakespeare-char, $SEEDS seeds (mean, min-max), $DEVICE" --out "$DEST/seeds_nanogpt.png"
      ;;
    *)
      echo "[seeds] unknown part '$part' in PARTS (original, pre, nanogpt)" >&2
      exit 2
      ;;
  esac
done
