# CPU image for dqrm_mpi: Open MPI, torch 2.13 (CPU build), Horovod 0.28.1 (MPI + Gloo), this
# package.  Built by the same installer as `make install` (launch/install.sh).  One container is
# one node: its ranks talk through shared memory (see README, "Running on a cluster").
#   docker build -t dqrm_mpi .
#   docker run --rm --shm-size=1g -v "$PWD/data:/data" dqrm_mpi \
#       horovodrun -np 2 -H localhost:2 dqrm-train --data /data/kaggle --out /data/runs/a
# (--shm-size: Open MPI's shared-memory transport outgrows Docker's default 64 MB /dev/shm.)
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: compilers, Open MPI headers, the Horovod build --------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VENV=/opt/dqrm/.venv
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
        libopenmpi-dev openmpi-bin \
    && rm -rf /var/lib/apt/lists/*
# torch's CPU build: on the default index alone, torch==2.13.0 resolves to the multi-GB CUDA build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /opt/dqrm
# Only the installer and the dependency list: code edits do not invalidate this layer (Horovod's
# compile takes 10-15 minutes).
COPY launch/install.sh launch/install.sh
COPY setup.cfg setup.cfg
RUN TORCH_INDEX_URL="$TORCH_INDEX_URL" INSTALL_PACKAGE=0 bash launch/install.sh \
    && rm -rf /root/.cache
COPY . .
RUN "$VENV/bin/pip" install --no-deps --no-build-isolation . && rm -rf build ./*.egg-info

# -- runtime: Open MPI's runtime, the venv and the launch scripts; no compilers, no caches --------
FROM ${PYTHON_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends openmpi-bin \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/dqrm /opt/dqrm
WORKDIR /opt/dqrm
ENV PATH=/opt/dqrm/.venv/bin:$PATH \
    DQRM_VENV=/opt/dqrm/.venv \
    PYTHONUNBUFFERED=1 \
    OMPI_ALLOW_RUN_AS_ROOT=1 \
    OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
RUN horovodrun --check-build && dqrm-train --help >/dev/null \
    && python -c "import dqrm_mpi.kernels as k, sys; sys.exit(0 if k.BUILT else k.WHY_NOT)"
CMD ["horovodrun", "--check-build"]
