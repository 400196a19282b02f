// The Python module dqrm_mpi._kernels: empty.  Importing it loads this library, whose other
// files register their operators under torch.ops.dqrm (TORCH_LIBRARY_FRAGMENT(dqrm, m)).
#include <Python.h>

static struct PyModuleDef kernels_module = {
    PyModuleDef_HEAD_INIT, "_kernels",
    "dqrm_mpi's fused CPU kernels; importing it registers the torch.ops.dqrm operators.",
    -1, nullptr};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&kernels_module); }
