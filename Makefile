# Two commands on a fresh machine:  make demo   |   make test
# Every target installs first (idempotent: skips what is done; see launch/install.sh).
VENV      ?= .venv
PY        := $(VENV)/bin/python
HOROVODRUN := $(VENV)/bin/horovodrun
NP        ?= 2
# Open MPI refuses root unless told; horovodrun has no flag for it.
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install demo test test-unit test-mpi test-slurm bench clean

install:
	VENV=$(VENV) bash launch/install.sh

demo: install
	NP=$(NP) bash launch/demo.sh

test: install
	$(MAKE) --no-print-directory test-unit test-mpi
	$(SLURM_TESTS)

test-unit:
	$(PY) -m pytest tests --ignore=tests/mpi -m "not slurm" -q -p no:cacheprovider

# Real ranks: every test in tests/mpi runs on 2 ranks (and the ones marked for it on 3).
test-mpi:
	$(HOROVODRUN) -np 2 -H localhost:2 $(PY) -m pytest tests/mpi -q -p no:cacheprovider -m "not np3"
	$(HOROVODRUN) -np 3 -H localhost:3 $(PY) -m pytest tests/mpi -q -p no:cacheprovider -m np3

# A real one-node SLURM cluster (launch/slurm_local.sh: munged, slurmctld, slurmd under a temporary
# directory; installs Debian's munge and slurm packages when missing; needs root, skipped otherwise):
# prep.sbatch (mpirun and srun) and train.sbatch with 2 tasks.  About 3.5 minutes on 2 cores (with the requeue test).
SLURM_TESTS = $(PY) -m pytest tests/slurm -m slurm -q -p no:cacheprovider
test-slurm: install
	$(SLURM_TESTS)

# The paper's tables and figures on planted data (<= 2 h on 2 cores): reports/small/report.md
.PHONY: repro
repro: install
	$(PY) -m dqrm_mpi.cli.repro run small --out reports/small

# The overfitting finding at scale (10 M criteo-like rows, 4 epochs, evaluation every quarter epoch; 8 runs of
# about 45-50 min each on one core; an interrupted suite resumes run by run): reports/medium/report.md
# REPRO_JOBS=2: two runs side by side on one core each (benchmarks/in_memory_limit.py --side-by-side compares).
REPRO_JOBS ?= 1
.PHONY: repro-medium
repro-medium: install
	$(PY) -m dqrm_mpi.cli.repro run medium --out reports/medium --jobs $(REPRO_JOBS)

bench: install
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf demo_out bench_out .pytest_cache
