#!/usr/bin/env bash
# Stage, HERE (not on the GPU machine), what a device call must carry, into git-ignored folders:
#   .gpu/anchors_gpu.py   the peers' script (../shared does not travel)
#   .gpu/data/{sst2,mrpc,squad}  the tasks' data (the tests and task_results read them as ../shared/data)
#   .whl/                 galore-torch, lomo-optim, bitsandbytes, gguf, jsonargparse[signatures]: benchmarks
#   .whl2/                gguf, jsonargparse[signatures], pytest-xdist, cma: task runs and the tests (small, leaves room for the SmolLM2 halves)
# Wheels are for the device image (Python 3.12, manylinux x86_64); packages the image already has are not fetched.
# A call carries at most 64 MiB in all, so carry single paths (".gpu/anchors_gpu.py", ".gpu/data"), never all of .gpu.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
shared=${SHARED:-"$root/../shared"}

mkdir -p .gpu/data
install -m 644 "$shared/tools/anchors_gpu.py" .gpu/anchors_gpu.py
for t in sst2 mrpc squad; do
  rm -rf ".gpu/data/$t" && cp -r "$shared/data/$t" ".gpu/data/$t" && chmod -R u+w ".gpu/data/$t"
done
grep -qx '/.whl2/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info && echo '/.whl2/' >> .git/info/exclude; }

JSONARGPARSE=(jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.14.0)  # typing-extensions: on the image
GGUF=(gguf==0.19.0)
XDIST=(pytest-xdist==3.8.0 execnet==2.1.2)  # the README runs the tests with -n auto
CMA=(cma==4.5.0)  # the tests' pycma comparisons (tests/test_dfo_optimizers.py) skip without it
BENCH=(galore-torch==1.0 lomo-optim==0.1.1 bitsandbytes==0.50.2)
fetch() {  # fetch DIR PKG...: one version of each, nothing else in DIR
  local dir=$1; shift
  mkdir -p "$dir" && rm -f "$dir"/*.whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$dir" "$@"
}
fetch .whl "${BENCH[@]}" "${GGUF[@]}" "${JSONARGPARSE[@]}"
fetch .whl2 "${GGUF[@]}" "${JSONARGPARSE[@]}" "${XDIST[@]}" "${CMA[@]}"
# .whl3/: DeepSpeed for the zero3 suite and the tests' ZeRO-3 cases. PyPI has only its source: build a pure-Python
# wheel here (no compiled ops; DeepSpeed picks its accelerator at run time, so a wheel built on this CPU machine works
# on the GPU). Its small dependencies come as wheels; pydantic's in .whl3/pyd, installed only where the image lacks it.
grep -qx '/.whl3/' .git/info/exclude 2>/dev/null || echo '/.whl3/' >> .git/info/exclude
fetch .whl3 hjson==3.1.0 ninja==1.13.2 msgpack==1.2.4 einops==0.8.2 py-cpuinfo==9.0.0
fetch .whl3/pyd pydantic==2.11.9 pydantic-core==2.33.2 annotated-types==0.7.0 typing-inspection==0.4.1
python3 -m pip download -q --no-deps --no-binary=:all: -d .whl3 deepspeed==0.19.8
# its setup imports torch: build with the project's environment (PYTHON=.venv/bin/python by default)
DS_BUILD_OPS=0 "${PYTHON:-.venv/bin/python}" -m pip wheel -q --no-deps --no-build-isolation -w .whl3 \
  .whl3/deepspeed-0.19.8.tar.gz

ls -la .gpu .gpu/data/sst2 .whl .whl2
du -sh .gpu/anchors_gpu.py .gpu/data .whl .whl2
cat <<'EOF'
The device side of each call: benchmarks/device_run.sh (smol-a, task, tests, harness). By hand:

Carry [".whl", ".gpu/anchors_gpu.py"] (benchmarks) or [".whl2", ".gpu/data", ...] (SST-2), and begin the command with:
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
(with .whl2/*.whl in the first line when carrying .whl2)
zero3 suite, and the tests' ZeRO-3 cases: also carry ".whl3" and add, after the first line:
python3 -c "import pydantic" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl3/pyd/*.whl
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl3/*.whl || exit
EOF
