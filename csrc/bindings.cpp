// gitfast._C, bindings: the op schemas, one device-agnostic entry per op (input checks at the
// boundary, output allocation, then the kernel of the inputs' device), the per-device registrations
// and the Python module whose import registers everything as torch.ops.gitfast.*.
//
// Each entry is registered for every device key that has kernels (CPU always, CUDA in builds with
// CUDA), never as a composite: gitfast/ops.py asks the dispatcher which devices have kernels.

#include <Python.h>

#include <ATen/core/enum_tag.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "ops.h"

#ifndef GITFAST_WITH_CUDA
#define GITFAST_WITH_CUDA 0
#endif
// setup.py generates this header (build/gitfast_generated) with why CUDA kernels are in or out.
#if __has_include("gitfast_build_info.h")
#include "gitfast_build_info.h"
#endif
#ifndef GITFAST_CUDA_BUILD_NOTE
#define GITFAST_CUDA_BUILD_NOTE "built without setup.py's build info"
#endif

namespace gitfast {
namespace {

// ---------------------------------------------------------------------------------------------
// Boundary checks (TORCH_CHECK with messages that name the op and the fix)
// ---------------------------------------------------------------------------------------------

// Parses the schema's `str activation`; refuses anything else, naming it.
Activation parse_activation(c10::string_view name) {
  if (name == "quick_gelu") return Activation::QuickGelu;
  if (name == "gelu") return Activation::Gelu;
  TORCH_CHECK_VALUE(false, "gitfast: unsupported activation '", std::string(name),
                    "'; expected 'quick_gelu' or 'gelu'");
}

void check_input(const char* op, const at::Tensor& x) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, "gitfast.", op, ": x has dtype ",
              t, "; supported dtypes are float32, float16 and bfloat16");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "gitfast.", op,
              ": x must have shape [..., width] with width > 0, got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), "gitfast.", op, ": x must be contiguous; call x.contiguous() first");
}

void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), "gitfast.", op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device(), "; move both to one device");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "gitfast.", op, ": ", name, " has dtype ", t.scalar_type(),
              " but x has ", x.scalar_type(), "; cast both to one dtype (e.g. ", name, ".to(x.dtype))");
  TORCH_CHECK(t.is_contiguous(), "gitfast.", op, ": ", name, " must be contiguous; call .contiguous() first");
}

void check_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x, int64_t n) {
  check_like(op, name, t, x);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "gitfast.", op, ": ", name, " must have shape [", n,
              "] to match the width of x, got ", t.sizes());
}

void check_layer_norm(const char* op, const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight,
                      const at::Tensor& bias) {
  check_input(op, x);
  if (residual != nullptr) {
    check_like(op, "residual", *residual, x);
    TORCH_CHECK(residual->sizes() == x.sizes(), "gitfast.", op, ": residual has shape ", residual->sizes(),
                " but x has ", x.sizes(), "; they must match");
  }
  check_vector(op, "weight", weight, x, x.size(-1));
  check_vector(op, "bias", bias, x, x.size(-1));
}

void check_bias_act(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  check_input(op, x);
  if (bias) check_vector(op, "bias", *bias, x, x.size(-1));
}

void check_mlp(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1, const at::Tensor& w2,
               const std::optional<at::Tensor>& b2) {
  check_input("mlp", x);
  check_like("mlp", "fc1_weight", w1, x);
  check_like("mlp", "fc2_weight", w2, x);
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == x.size(-1), "gitfast.mlp: fc1_weight must have shape [hidden, ",
              x.size(-1), "] (nn.Linear layout, in-features = width of x), got ", w1.sizes());
  TORCH_CHECK(w2.dim() == 2 && w2.size(1) == w1.size(0), "gitfast.mlp: fc2_weight must have shape [out, ",
              w1.size(0), "] (in-features = rows of fc1_weight), got ", w2.sizes());
  if (b1) check_vector("mlp", "fc1_bias", *b1, x, w1.size(0));
  if (b2) check_vector("mlp", "fc2_bias", *b2, x, w2.size(0));
}

// ---------------------------------------------------------------------------------------------
// Kernels of a device
// ---------------------------------------------------------------------------------------------

struct Kernels {
  decltype(&cpu_kernels::layer_norm) layer_norm;
  decltype(&cpu_kernels::bias_act) bias_act;
};

// The kernels for tensors on x's device (the checks have put every input there).
const Kernels& kernels_for(const char* op, const at::Tensor& x) {
  static const Kernels cpu{&cpu_kernels::layer_norm, &cpu_kernels::bias_act};
#if GITFAST_WITH_CUDA
  static const Kernels cuda{&cuda_kernels::layer_norm, &cuda_kernels::bias_act};
  if (x.is_cuda()) return cuda;
#endif
  TORCH_CHECK(x.is_cpu(), "gitfast.", op, ": no kernel for tensors on ", x.device());
  return cpu;
}

// ---------------------------------------------------------------------------------------------
// Op entries, one per op for every device
// ---------------------------------------------------------------------------------------------

at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  check_layer_norm("layer_norm", x, nullptr, weight, bias);
  const Kernels& k = kernels_for("layer_norm", x);
  at::Tensor y = at::empty_like(x);
  k.layer_norm("layer_norm", x, nullptr, weight, bias, eps, y, nullptr);
  return y;
}

std::tuple<at::Tensor, at::Tensor> add_layer_norm(const at::Tensor& x, const at::Tensor& residual,
                                                  const at::Tensor& weight, const at::Tensor& bias, double eps) {
  check_layer_norm("add_layer_norm", x, &residual, weight, bias);
  const Kernels& k = kernels_for("add_layer_norm", x);
  at::Tensor y = at::empty_like(x);
  at::Tensor s = at::empty_like(x);
  k.layer_norm("add_layer_norm", x, &residual, weight, bias, eps, y, &s);
  return {y, s};
}

at::Tensor bias_act(const at::Tensor& x, const std::optional<at::Tensor>& bias, c10::string_view activation) {
  const Activation act = parse_activation(activation);
  check_bias_act("bias_act", x, bias);
  const Kernels& k = kernels_for("bias_act", x);
  at::Tensor y = at::empty_like(x);
  k.bias_act(x, bias, act, y);
  return y;
}

// GEMM (ATen: MKL/oneDNN or cuBLAS), the device's fused bias + activation pass in place, then GEMM
// with the second bias folded in (addmm).
at::Tensor mlp(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1, const at::Tensor& w2,
               const std::optional<at::Tensor>& b2, c10::string_view activation) {
  const Activation act = parse_activation(activation);
  check_mlp(x, w1, b1, w2, b2);
  const Kernels& k = kernels_for("mlp", x);
  const c10::OptionalDeviceGuard guard(x.is_cpu() ? std::nullopt : std::optional<c10::Device>(x.device()));
  const int64_t width = x.size(-1);
  const at::Tensor x2 = x.view({x.numel() / width, width});  // numel/width, not -1: rows may be 0
  at::Tensor h = at::mm(x2, w1.t());
  k.bias_act(h, b1, act, h);
  at::Tensor out = b2 ? at::addmm(*b2, h, w2.t()) : at::mm(h, w2.t());
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = w2.size(0);
  return out.view(shape);
}

}  // namespace
}  // namespace gitfast

// ---------------------------------------------------------------------------------------------
// Registration. FRAGMENT, not TORCH_LIBRARY: Python code may add ops to the same namespace.
// ---------------------------------------------------------------------------------------------
TORCH_LIBRARY_FRAGMENT(gitfast, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def("layer_norm(Tensor x, Tensor weight, Tensor bias, float eps) -> Tensor", tags);
  m.def("add_layer_norm(Tensor x, Tensor residual, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor)",
        tags);
  m.def("bias_act(Tensor x, Tensor? bias, str activation) -> Tensor", tags);
  m.def("mlp(Tensor x, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, "
        "str activation) -> Tensor",
        tags);
}

// The same entries for every device: they pick the device's kernels themselves.
#define GITFAST_IMPL_ALL(m)                           \
  m.impl("layer_norm", &gitfast::layer_norm);         \
  m.impl("add_layer_norm", &gitfast::add_layer_norm); \
  m.impl("bias_act", &gitfast::bias_act);             \
  m.impl("mlp", &gitfast::mlp)

TORCH_LIBRARY_IMPL(gitfast, CPU, m) { GITFAST_IMPL_ALL(m); }
#if GITFAST_WITH_CUDA
TORCH_LIBRARY_IMPL(gitfast, CUDA, m) { GITFAST_IMPL_ALL(m); }
#endif

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "gitfast's compiled ops; importing registers them as torch.ops.gitfast.*", -1,
                               nullptr};
  PyObject* mod = PyModule_Create(&module);
  // with_cuda: whether CUDA kernels were compiled in; cuda_build_note: why (or with which toolkit),
  // so a CPU-only extension under a CUDA build of torch is told apart at run time
  if (mod != nullptr && (PyModule_AddIntConstant(mod, "with_cuda", GITFAST_WITH_CUDA) != 0 ||
                         PyModule_AddStringConstant(mod, "cuda_build_note", GITFAST_CUDA_BUILD_NOTE) != 0)) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
