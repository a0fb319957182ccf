// The metalq operator library: every schema, and the Python module that loads it.
#include <Python.h>
#include <torch/library.h>

// Importing metalq._C runs the static registrations below; the module itself is empty.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(metalq, m) {
  m.set_python_module("metalq.ops");
  m.def("affine_quantize(Tensor w, int group_size, int bits) -> (Tensor, Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  m.def("affine_dequantize(Tensor w, Tensor scales, Tensor biases, int group_size, int bits) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("affine_qmm_t(Tensor x, Tensor w, Tensor scales, Tensor biases, int group_size, int bits) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("affine_qmm_n(Tensor x, Tensor w, Tensor scales, Tensor biases, int group_size, int bits) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("pack(Tensor q, int bits) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("unpack(Tensor w, int bits) -> Tensor", {at::Tag::pt2_compliant_tag});
}
