#!/usr/bin/env bash
# Idempotent installer shared by `make install`, CI and the Dockerfile.
#
#   1. Debian's Open MPI (libopenmpi-dev, openmpi-bin)       skipped when mpicc and mpirun exist
#   2. a virtual environment (VENV, default .venv)            skipped when it exists
#   3. torch==2.13.0 (the CPU build) and build helpers         skipped when installed
#   4. Horovod 0.28.1 with PyTorch, MPI and Gloo              skipped when `horovodrun --check-build` shows them;
#      the wheel is built once from the PyPI sdist (C++17 patch) and cached in WHEEL_CACHE
#      (~/.cache/dqrm_mpi/wheels/torch-VERSION), so later installs take seconds
#   5. this package (editable) with its dependencies and      skipped when setup.cfg, setup.py and
#      its fused CPU kernels (dqrm_mpi/csrc, about 20 s a file)  dqrm_mpi/csrc have not changed
#      INSTALL_PACKAGE=0: only the dependencies listed in setup.cfg, not the package (the
#      Dockerfile's cached layer, built before the code is copied in)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
HOROVOD_VERSION=0.28.1
TORCH_VERSION=2.13.0
# Horovod's torch extension is compiled against one torch: the cache is keyed by that version.
WHEEL_CACHE="${WHEEL_CACHE:-$HOME/.cache/dqrm_mpi/wheels/torch-$TORCH_VERSION}"
PY="${PYTHON:-python3}"

log() { printf '[install] %s\n' "$*"; }

# 1. Open MPI ---------------------------------------------------------------
if command -v mpicc >/dev/null && command -v mpirun >/dev/null; then
  log "Open MPI present: $(mpirun --version 2>/dev/null | head -n1)"
else
  log "installing Debian's libopenmpi-dev openmpi-bin"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
    libopenmpi-dev openmpi-bin
fi

# 2. virtual environment ----------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# 3. torch (CPU build: an exact pin takes the local wheel) --------------------
if python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('$TORCH_VERSION') else 1)" 2>/dev/null; then
  log "torch $TORCH_VERSION present"
else
  log "installing torch==$TORCH_VERSION and build helpers"
  # TORCH_INDEX_URL (optional): a wheel index serving torch's CPU build, where the default index
  # would resolve the exact pin to a multi-GB CUDA build (e.g. in a container).
  pip install -q ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION"
  pip install -q numpy packaging wheel "setuptools>=64"
  command -v cmake >/dev/null || pip install -q "cmake<4"
fi

# 4. Horovod ------------------------------------------------------------------
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
horovod_ok() {
  command -v horovodrun >/dev/null || return 1
  local out; out="$(horovodrun --check-build 2>/dev/null)" || return 1
  grep -q '\[X\] PyTorch' <<<"$out" && grep -q '\[X\] MPI' <<<"$out" && grep -q '\[X\] Gloo' <<<"$out"
}
if horovod_ok; then
  log "Horovod present with PyTorch, MPI and Gloo"
else
  mkdir -p "$WHEEL_CACHE"
  wheel="$(ls "$WHEEL_CACHE"/horovod-$HOROVOD_VERSION-*.whl 2>/dev/null | head -n1 || true)"
  if [ -z "$wheel" ]; then
    log "building Horovod $HOROVOD_VERSION from its sdist (about 5 minutes on 2 cores, once)"
    src="$(mktemp -d)"
    pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$src"
    tar -xzf "$src"/horovod-$HOROVOD_VERSION.tar.gz -C "$src"
    # torch 2.x headers need C++17; Horovod 0.28.1 pins 14 (fixed upstream after the release).
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
      "$src/horovod-$HOROVOD_VERSION/CMakeLists.txt" \
      "$src/horovod-$HOROVOD_VERSION/horovod/torch/CMakeLists.txt"
    grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod-$HOROVOD_VERSION/horovod/torch/CMakeLists.txt"
    CMAKE_POLICY_VERSION_MINIMUM=3.5 HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
      HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=MPI \
      MAKEFLAGS="-j$(nproc)" \
      pip wheel -q --no-build-isolation --no-deps -w "$src/wheel" "$src/horovod-$HOROVOD_VERSION"
    built="$(ls "$src"/wheel/horovod-*.whl)"
    cp "$built" "$WHEEL_CACHE/.tmp-$(basename "$built")"
    mv "$WHEEL_CACHE/.tmp-$(basename "$built")" "$WHEEL_CACHE/$(basename "$built")"   # atomic
    wheel="$WHEEL_CACHE/$(basename "$built")"
    rm -rf "$src"
  fi
  log "installing $wheel"
  pip install -q --force-reinstall --no-deps "$wheel"
  pip install -q cloudpickle psutil pyyaml packaging cffi   # Horovod's runtime dependencies
  horovod_ok || { horovodrun --check-build; echo "Horovod lacks PyTorch, MPI or Gloo" >&2; exit 1; }
fi

# 5. the package --------------------------------------------------------------
if [ "${INSTALL_PACKAGE:-1}" = 0 ]; then
  log "installing the dependencies listed in setup.cfg (not the package)"
  python - "$ROOT/setup.cfg" >"$VENV/.dqrm_mpi-requirements.txt" <<'PY'
import configparser, sys
cfg = configparser.ConfigParser()
cfg.read(sys.argv[1])
print(cfg["options"]["install_requires"].strip())
PY
  pip install -q -r "$VENV/.dqrm_mpi-requirements.txt"
  exit 0
fi
stamp="$VENV/.dqrm_mpi-installed"
# the metadata and the kernels' sources: an edited kernel is rebuilt by the next `make install`
want="$(cat "$ROOT/setup.cfg" "$ROOT/setup.py" "$ROOT"/dqrm_mpi/csrc/* | sha256sum | cut -d' ' -f1) $ROOT"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && python -c "import dqrm_mpi.kernels, data_prep" 2>/dev/null; then
  log "dqrm_mpi present"
else
  log "installing dqrm_mpi (editable) with its dependencies"
  # [horovod] is satisfied by the wheel of step 4 (same version): pip builds nothing here
  pip install -q --no-build-isolation -e "$ROOT[test,horovod]"
  python -c "import dqrm_mpi.kernels as k, sys; sys.exit(0 if k.BUILT else 'the CPU kernels did not build: ' + k.WHY_NOT)"
  echo "$want" > "$stamp"
fi
horovodrun --check-build | sed -n '1,20p'
