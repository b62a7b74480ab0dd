#!/usr/bin/env bash
# One call on the GPU machine: the GPU tests, A/Bs against an earlier revision, the benchmarks.
#
#   bash scripts/device_check.sh [steps...]      (default: tests scan memory)
#     tests        pytest -n 4 -m gpu: tests/kernels/test_gpu.py, every kernel at real sizes (minutes on
#                  a fresh machine, most of it compiling: session 20 ran out of its call there)
#     triton       pytest -n 8 -m "triton and not gpu": the interpreter tests' small shapes, compiled
#                  for the GPU (over 8 min on a fresh machine, serially: hundreds of small compiles)
#     ab:REV       benchmarks/ab.py REV scan, then REV memory (the auto and fused-tma backwards)
#     scan         benchmarks/recurrence.py --only scan   (peers from .whl/, if carried)
#     gated        benchmarks/recurrence.py --only gated
#     memory       benchmarks/memory.py --no-decode
#   bash scripts/device_check.sh --prepare REV   (here, before the call)
#     writes .ab/REV/{scan,memory}.py from git: the device machine gets the working tree's files,
#     not its .git, so an ab:REV step there reads these (name ".ab" in the call's carry)
#
# The device tool runs it in the repository root; each step's log goes to $OUT (or ./device-out)
# and its last lines to stdout. Peers' pure-Python wheels (accelerated-scan, fla-core) travel in
# .whl/ (git-ignored: `pip download --no-deps -d .whl accelerated-scan==0.3.1 fla-core==0.6.0`,
# then name ".whl" in the call's carry); they are installed under /tmp/peers, never over the
# image's torch. The image's torch and Triton are used as they are.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --prepare ]; then
  [ -n "${2:-}" ] || { echo "device_check.sh --prepare: which revision?" >&2; exit 2; }
  mkdir -p ".ab/$2"
  for op in scan memory; do
    git show "$2:kernels/$op/kernel.py" >".ab/$2/$op.py" || exit 2
  done
  echo "wrote .ab/$2/scan.py and .ab/$2/memory.py (carry \".ab\")"
  exit 0
fi
[ $# -gt 0 ] || set -- tests scan memory
for s in "$@"; do
  case "$s" in
    tests | triton | ab:?* | scan | gated | memory) ;;
    *) echo "device_check.sh: unknown step '$s' (tests, triton, ab:REV, scan, gated, memory)" >&2; exit 2 ;;
  esac
done
out="${OUT:-device-out}"
mkdir -p "$out"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
if compgen -G ".whl/*.whl" >/dev/null; then
  python -m pip install --quiet --no-deps --target /tmp/peers .whl/*.whl && export PYTHONPATH="/tmp/peers:${PYTHONPATH:-}"
fi
python -c "import pytest" 2>/dev/null || python -m pip install --quiet pytest
status=0
step() {  # step NAME CMD...: runs CMD, logs it, prints its tail and time
  local name=$1 start=$SECONDS
  shift
  echo "== $name: $*"
  "$@" >"$out/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$out/$name.log"
  echo "== $name: exit $rc in $((SECONDS - start)) s"
  [ $rc -eq 0 ] || status=1
}
for s in "$@"; do
  case "$s" in
    tests) step tests python -m pytest -q -n 4 -m gpu tests -p no:cacheprovider -rfE --durations=10 ;;
    triton) step triton python -m pytest -q -n 8 -m "triton and not gpu" tests -p no:cacheprovider -rfE --durations=10 ;;
    ab:*)
      rev=${s#ab:}
      a_scan=$rev a_memory=$rev
      if [ -d ".ab/$rev" ]; then a_scan=.ab/$rev/scan.py a_memory=.ab/$rev/memory.py; fi
      step "ab-scan" python benchmarks/ab.py "$a_scan" scan
      step "ab-memory" python benchmarks/ab.py "$a_memory" memory --bwd auto fused-tma
      ;;
    scan) step scan python benchmarks/recurrence.py --only scan ;;
    gated) step gated python benchmarks/recurrence.py --only gated ;;
    memory) step memory python benchmarks/memory.py --no-decode ;;
  esac
done
exit $status
