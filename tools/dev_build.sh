#!/usr/bin/env bash
# Developer build without pip: compiles the extension into build/dev-NAME and stages a copy of the
# package with it in build/stage-NAME, so several people can build side by side.
# Usage: eval "$(tools/dev_build.sh NAME [extra cmake args])"   -> exports PYTHONPATH
set -euo pipefail
name=${1:?usage: tools/dev_build.sh NAME [cmake args]}; shift
root=$(cd "$(dirname "$0")/.." && pwd)
bdir="$root/build/dev-$name"; stage="$root/build/stage-$name"
cmake -S "$root" -B "$bdir" -G Ninja -DSDQ_PYTHON=ON -DCMAKE_BUILD_TYPE=Release \
  -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" "$@" >&2
cmake --build "$bdir" -j 2 >&2
mkdir -p "$stage"
rm -rf "$stage/sdq"; cp -r "$root/python/sdq" "$stage/sdq"
# copy then rename: a running process keeps the old file (overwriting it in place crashes it)
for so in "$bdir"/_core*.so; do cp "$so" "$stage/sdq/.tmp.so" && mv "$stage/sdq/.tmp.so" "$stage/sdq/$(basename "$so")"; done
echo "export PYTHONPATH=$stage"
