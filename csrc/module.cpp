// The Python module dynenc._C. Each csrc/<op>.cpp registers its own dynenc:: schemas and CPU
// kernels (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL); CUDA (Triton), fake and autograd
// implementations are registered from dynenc/ops/.
#include <Python.h>

extern "C" {
// `import dynenc._C` loads this library, whose static initialisers register the ops.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
