"""dqrm_mpi.kernels: the installed package has its C++ kernels, and the switches that turn them off."""
import os
import subprocess
import sys

from dqrm_mpi import kernels


def test_the_installed_package_has_its_kernels():
    # `make install` builds them (and stops when they do not build): a missing library here means
    # every fused path silently fell back to PyTorch
    assert kernels.BUILT, kernels.WHY_NOT


def test_disabled_switches_them_off_for_a_block_only():
    before = kernels.enabled()
    with kernels.disabled():
        assert not kernels.enabled()
    assert kernels.enabled() == before


def test_the_environment_turns_them_off_for_a_process():
    env = dict(os.environ, DQRM_KERNELS="0")
    out = subprocess.run([sys.executable, "-c", "from dqrm_mpi import kernels; print(kernels.BUILT, kernels.enabled())"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]
