// Schemas of the kernel-level ops behind icd.ops (namespace icd_ext).
//
// The public ops (icd::instance_attention, ...) are defined in Python
// (icd/ops/library.py) with their fake kernels and autograd; for the "cpu" and "cuda"
// backends they call these kernel ops, whose CPU kernels live in csrc/cpu/ and whose
// CUDA kernels live in csrc/cuda/. Forward outputs are contiguous; gradients (dq, dk, dv,
// the student's) have the strides of their inputs, as at::empty_like gives them.
//
// Letters as in docs/method.md: q [N, h, K, D]; k, v, student, teacher [N, h, S, D];
// key_padding_mask bool [N, S] (True = ignore); weight [N, K] (value_mask) or
// [N, h, S] (feature_mse); lse [N, h, K] float32.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing icd._C from Python runs the static registrations below. The module records how
// it was built: icd._C.with_cuda is 1 when csrc/cuda was compiled in (setup.py defines
// ICD_WITH_CUDA then), else 0; icd.ops reads it to know whether the "cuda" backend exists.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
#ifdef ICD_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && PyModule_AddIntConstant(module, "with_cuda", with_cuda) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

TORCH_LIBRARY(icd_ext, m) {
  // -> (out [N, h, K, D] in q's dtype, lse [N, h, K] float32)
  m.def("attention_forward(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, "
        "float scale) -> (Tensor, Tensor)");
  // grad_lse may be None (treated as zeros). -> (dq, dk, dv) in the dtypes and strides of
  // q, k, v.
  m.def("attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, "
        "Tensor? key_padding_mask, Tensor out, Tensor lse, float scale) "
        "-> (Tensor, Tensor, Tensor)");
  // -> [N, h, S] float32. lse may only be given when temperature == 1.
  m.def("value_mask(Tensor q, Tensor k, Tensor weight, Tensor? key_padding_mask, "
        "Tensor? lse, float scale, float temperature) -> Tensor");
  // norm in {"ln", "tln", "none"}, reduction in {"per_head", "global"}. -> 0-dim float32.
  m.def("feature_mse_forward(Tensor student, Tensor teacher, Tensor weight, str norm, "
        "float eps, str reduction) -> Tensor");
  // grad_loss 0-dim. -> grad of student, in the student's dtype and strides.
  m.def("feature_mse_backward(Tensor grad_loss, Tensor student, Tensor teacher, "
        "Tensor weight, str norm, float eps, str reduction) -> Tensor");
}
