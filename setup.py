"""Builds dqrm_mpi's fused CPU kernels: every ``dqrm_mpi/csrc/*.cpp`` into the extension module
``dqrm_mpi._kernels``, whose import registers the ``torch.ops.dqrm`` operators
(``dqrm_mpi.kernels``).  Metadata, dependencies and entry points live in setup.cfg.

Built against the installed torch (``pip install --no-build-isolation``, as launch/install.sh
and the Dockerfile do).  Flags: -O3, and -ffp-contract=off so that no a * b + c becomes a fused
multiply-add (the kernels must give PyTorch's numbers bit for bit); -fopenmp for at::parallel_for.
Hot loops pick AVX-512 / AVX2 / baseline code at run time (GCC's target_clones), so a build runs
on any x86-64 node.
"""
import glob

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

setup(
    ext_modules=[CppExtension(
        "dqrm_mpi._kernels",
        sorted(glob.glob("dqrm_mpi/csrc/*.cpp")),
        depends=sorted(glob.glob("dqrm_mpi/csrc/*.h")),  # a changed header rebuilds every file
        # -fopenmp: at::parallel_for runs on torch's OpenMP threads (without it, serially); the
        # library links libgomp.so.1, which resolves to the copy torch has already loaded
        extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"],
        extra_link_args=["-fopenmp"],
    )],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=False)},
)
