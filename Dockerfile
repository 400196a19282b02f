# CPU image for dqrm_mpi: Open MPI, torch 2.13 (CPU), Horovod 0.28.1 (MPI + Gloo), this package.
# It runs the same installer as `make install`, so the image is built by the tested path.
#   docker build -t dqrm_mpi .
#   docker run --rm dqrm_mpi horovodrun -np 2 -H localhost:2 dqrm-train --help
FROM python:3.11-slim-bookworm

ENV DEBIAN_FRONTEND=noninteractive \
    OMPI_ALLOW_RUN_AS_ROOT=1 \
    OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
    VENV=/opt/dqrm/.venv \
    PATH=/opt/dqrm/.venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake git make \
    && rm -rf /var/lib/apt/lists/*

# Set to PyTorch's CPU wheel index (docker build --build-arg TORCH_INDEX_URL=...) to install the
# CPU build of torch 2.13.0 instead of the default index's CUDA build.
ARG TORCH_INDEX_URL=""
ENV TORCH_INDEX_URL=${TORCH_INDEX_URL}

WORKDIR /opt/dqrm
# The installer and package metadata first, so the slow Horovod build is cached across code edits.
COPY launch/install.sh launch/install.sh
COPY setup.cfg pyproject.toml README.md ./
COPY dqrm_mpi dqrm_mpi
COPY data_prep data_prep
RUN bash launch/install.sh && rm -rf /root/.cache/pip
COPY . .
RUN horovodrun --check-build
CMD ["horovodrun", "--check-build"]
