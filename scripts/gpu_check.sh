#!/usr/bin/env bash
# The one prepared GPU check for issue 13 (CUDA decode, CUDA graphs, the int8 kernel, the memory-limited
# mode). Run from the repository root on a machine with CUDA, under its own python3 (torch with CUDA,
# transformers, accelerate, triton); results go to $OUT (default ./gpu_check_out):
#   env.txt     versions and the GPU
#   tests.log   tests/test_cuda.py and tests/test_offload.py on CUDA (nothing may skip there)
#   bench.log   scripts/gpu_check.py's progress and tables; gpu_check.md / gpu_check.json the results
# Through this workplace's device tool: run `bash scripts/gpu_check.sh` with timeout_s 600, carrying .whl
# (coreinfer imports the `gguf` package, which that image lacks: put its wheel in .whl first, see
# docs/speed.md). It takes about 8 minutes: the tests 1-2, the two models' benchmarks the rest.
set -uo pipefail
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site" || exit 1
fi
python3 -c "import torch, transformers, accelerate, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
torch.cuda.get_device_name(), 'transformers', transformers.__version__, 'accelerate', accelerate.__version__,
'triton', triton.__version__)" 2>&1 | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee -a "$OUT/env.txt"
timeout 240 python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py tests/test_offload.py 2>&1 | tee "$OUT/tests.log"
timeout 330 python3 scripts/gpu_check.py --out "$OUT" 2>&1 | tee "$OUT/bench.log"
