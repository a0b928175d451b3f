#!/usr/bin/env bash
# Device-side steps, run from the repository root on the GPU machine (stage with prepare_device.sh first):
#   bash benchmarks/device_run.sh smol-a                      carry .models/a: half a of SmolLM2 to ~/smol
#   bash benchmarks/device_run.sh task TASK SEEDS SPECS NAME [task_results args]
#                                                           carry .models/b (first time), .whl2, .gpu/data: joins
#                                                           SmolLM2 once, then benchmarks.task_results into $OUT/NAME
#   bash benchmarks/device_run.sh tests                       carry .whl, .whl2, .whl3, .gpu/data, .gpu/anchors_gpu.py:
#                                                           the README's test command into $OUT/pytest_<h100|h200>_<commit>.txt
#   bash benchmarks/device_run.sh harness ARGS...             carry .whl, .gpu/anchors_gpu.py: benchmarks.harness
#   bash benchmarks/device_run.sh bench MODULE ARGS...        python -m benchmarks.MODULE ARGS (e.g. overlap_probe)
# The machine goes back after 30 s idle: have the next call ready before this one returns.
# The device copy's git HEAD can lag a commit made since the machine started (it did on 2026-12-04): prefix a call
# with MEMOPT_COMMIT=$(git rev-parse --short HEAD), from this side, so the records name what ran.
set -u
cd "$(dirname "$0")/.."
commit=${MEMOPT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}

setup() {  # the carried wheels into /tmp/site; ../shared pointed at the carried copies
  local d
  for d in .whl .whl2 .whl3; do
    if compgen -G "$d/*.whl" >/dev/null; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $d/*.whl || exit 1
    fi
  done
  if [ -d .whl3/pyd ] && ! python3 -c "import pydantic" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl3/pyd/*.whl || exit 1
  fi
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
  mkdir -p ../shared/tools /tmp/bin
  if [ -d .gpu/data ] && [ ! -e ../shared/data ]; then ln -s "$PWD/.gpu/data" ../shared/data; fi
  if [ -f .gpu/anchors_gpu.py ]; then cp .gpu/anchors_gpu.py ../shared/tools/anchors_gpu.py; fi
  # two tests run the memopt console script; the tree is not pip-installed here
  printf '#!/usr/bin/env python3\nfrom lightning_memopt.cli import main\nmain()\n' > /tmp/bin/memopt && chmod +x /tmp/bin/memopt
  export PATH=/tmp/bin:$PATH
  echo "commit $commit; $(nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader)"
}

smol=~/smol/SmolLM2-135M-Instruct.Q4_1.gguf
case "${1:-}" in
  smol-a)
    mkdir -p ~/smol && cp .models/a/part ~/smol/a.part && echo "half a in ~/smol" ;;
  task)
    [ $# -ge 5 ] || { echo "usage: task TASK SEEDS SPECS NAME [task_results args]"; exit 2; }
    task=$2 seeds=$3 specs=$4 name=$5; shift 5
    if [ ! -f $smol ]; then
      [ -f ~/smol/a.part ] || { echo "no ~/smol/a.part: run smol-a first (the machine may have gone back)"; exit 1; }
      cat ~/smol/a.part .models/b/part > $smol.part && mv $smol.part $smol
      (cd ~/smol && sha256sum -c "$OLDPWD/.models/b/SHA256SUMS") || { rm -f $smol; exit 1; }
    fi
    setup
    data=.gpu/data/$task; [ "$task" = squad ] && data=.gpu/data/squad/dev-subset.json
    python3 -u -m benchmarks.task_results --task "$task" --data "$data" --seeds "$seeds" --methods "$specs" \
      --out "$OUT/$name" "$@" 2>&1 | grep -v -i "warn" | tail -60 ;;
  tests)
    setup
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o -m1 'H[0-9]\+' | tr H h)
    log=$OUT/pytest_${gpu:-gpu}_$commit.txt
    timeout 540 python3 -m pytest -q -rs -n auto tests -p no:cacheprovider > "$log" 2>&1; echo "RC=$?" >> "$log"
    tail -15 "$log" ;;
  harness)
    shift; setup
    python3 -u -m benchmarks.harness "$@" ;;
  bench)
    [ $# -ge 2 ] || { echo "usage: bench MODULE [ARGS]"; exit 2; }
    module=$2; shift 2; setup
    python3 -u -m "benchmarks.$module" "$@" ;;
  *)
    sed -n '2,/^set -u/p' "$0" | grep '^#'; exit 2 ;;
esac
