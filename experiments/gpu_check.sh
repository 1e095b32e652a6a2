#!/usr/bin/env bash
# The prepared check for one GPU (experiments/gpu_check.py says what each part measures): under
# 8 minutes, offline, then one table. Results go to $OUT/gpu_check/ (default /tmp/gpu_check/):
# a JSON file per part, log.txt, table.txt.
#
#   python experiments/gpu_carry.py build    # once, where TensorFlow and pip's index are: .carry/
#   bash experiments/gpu_check.sh            # on the GPU machine, .carry/ in the checkout
#   bash experiments/gpu_check.sh --quick    # toy sizes on any CPU: the plumbing, a few minutes (CI runs it)
set -uo pipefail
cd "$(dirname "$0")/.."
quick=""
if [ "${1:-}" = "--quick" ]; then quick="--quick"; fi
out="${OUT:-/tmp}/gpu_check"
rm -rf "$out" && mkdir -p "$out/work"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
log="$out/log.txt"

if [ -z "$quick" ] && [ -d .carry/wheels ]; then  # what a bare GPU image lacks, offline
  python experiments/gpu_carry.py install 2>&1 | tee -a "$log"
fi

# part -> time limit in seconds (the full check's add up to the 470 s budget; --quick: any CPU).
if [ -z "$quick" ]; then
  budget=470
  limits=(env:15 tests:150 train:110 tools:35 resnet50:70 fast:40 flags:45)
else
  budget=1800
  limits=(env:120 tests:300 train:600 tools:300 resnet50:600 fast:600 flags:600)
fi
start=$SECONDS
for entry in "${limits[@]}"; do
  part=${entry%%:*}
  limit=${entry##*:}
  left=$((budget - (SECONDS - start)))
  if [ "$left" -lt 10 ]; then
    echo "$part: skipped, the time budget is spent" | tee -a "$log"
    echo 124 >"$out/$part.status"
    continue
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $part (limit ${limit} s)" | tee -a "$log"
  extra_env=()
  # ResNet-50 runs JAX and PyTorch in one process: JAX allocates as it goes instead of taking
  # 75% of the GPU at start, so that PyTorch finds room (a user's own setting wins).
  if [ "$part" = resnet50 ]; then
    extra_env=(XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}")
  fi
  env ${extra_env[@]+"${extra_env[@]}"} timeout --kill-after=10 "$limit" \
    python experiments/gpu_check.py "$part" $quick --out "$out" --root "$out/work" >>"$log" 2>&1
  echo $? >"$out/$part.status"
  echo "   exit $(cat "$out/$part.status") after $((SECONDS - start)) s" | tee -a "$log"
done
python experiments/gpu_check.py table --out "$out" | tee "$out/table.txt"
# Any part that failed or ran out of time fails the check (CI runs the --quick form).
for entry in "${limits[@]}"; do
  if [ "$(cat "$out/${entry%%:*}.status")" != 0 ]; then
    echo "gpu_check: part ${entry%%:*} failed (status $(cat "$out/${entry%%:*}.status")); see $log" >&2
    exit 1
  fi
done
