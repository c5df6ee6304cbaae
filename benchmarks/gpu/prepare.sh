#!/usr/bin/env bash
# Fills .carry/ (git-ignored) with what the lent GPU machine lacks, for benchmarks/gpu/session.py.
#
#   bash benchmarks/gpu/prepare.sh [--no-data] [--with WHEEL_SPEC ...]
#
# The GPU image has jax, flax, optax, orbax-checkpoint, tensorstore, torch and timm but no
# internet, and not grain, TFDS, ml_collections, qwix or tensorboardX. This downloads the
# wheels of benchmarks/gpu/wheels.txt (CPython 3.12, x86-64 manylinux, no dependencies: the list
# names each one) into .carry/whl, and copies the Fashion-MNIST IDX files into
# .carry/fashion-mnist (--no-data skips them: the bench jobs use synthetic data). --with adds
# wheels, e.g. `--with tensorstore==0.1.86` if the image's tensorstore is older than orbax needs
# (session.py's env step prints every version). The device tool carries at most 64 MiB with the
# working tree; the total is checked at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
data=1
extra=()
while (($#)); do
  case $1 in
    --no-data) data=0 ;;
    --with) shift; extra+=("$1") ;;
    *) echo "prepare.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
py=${PYTHON:-python3.12}
# From empty: a stale wheel beside a new version of it stops the whole install there.
rm -rf .carry/whl
mkdir -p .carry/whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
mapfile -t specs < <(grep -v '^\s*\(#\|$\)' benchmarks/gpu/wheels.txt | sed 's/\s*#.*//')
for spec in "${specs[@]}" "${extra[@]}"; do
  if ! "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp "${platforms[@]}" -d .carry/whl "$spec" 2>/dev/null; then
    # Pure-Python packages published as sources only (promise) are built here.
    "$py" -m pip wheel -q --no-deps -w .carry/whl "$spec"
  fi
done
if ((data)); then
  src=${JKD_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
  mkdir -p .carry/fashion-mnist
  cp "$src"/*-ubyte.gz .carry/fashion-mnist/
else
  rm -rf .carry/fashion-mnist
fi
carry=$(du -sb .carry | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
total=$(( (carry + tree) / 1048576 ))
wheels=(.carry/whl/*.whl)
echo "prepare.sh: .carry holds ${#wheels[@]} wheels$( ((data)) && echo ' and Fashion-MNIST');" \
     "with the working tree about ${total} MiB travel (limit 64 MiB)"
if ((total >= 64)); then
  echo "prepare.sh: too large for the device tool: drop the data (--no-data) or wheels" >&2
  exit 1
fi
