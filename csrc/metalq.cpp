// The metalq operator library: every schema, and the Python module metalq._C. Importing the module
// runs the static registrations; it also exposes the DispatchPlan, so tests can run an op "as the
// Mac would" through the Metal emulator on any platform.
#include <torch/extension.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/kernels.h"
#include "plan.h"

namespace {

py::dict plan_to_python(const metalq::DispatchPlan& plan) {
  py::list buffers, bytes;
  for (const auto& b : plan.buffers) buffers.append(py::make_tuple(b.index, b.tensor));
  for (const auto& b : plan.bytes)
    bytes.append(py::make_tuple(b.index, py::bytes(reinterpret_cast<const char*>(b.bytes.data()), b.bytes.size())));
  py::dict d;
  d["kernel"] = plan.kernel;
  d["threadgroups"] = py::make_tuple(plan.threadgroups[0], plan.threadgroups[1], plan.threadgroups[2]);
  d["threads_per_threadgroup"] = py::make_tuple(plan.threads_per_threadgroup[0], plan.threads_per_threadgroup[1],
                                                plan.threads_per_threadgroup[2]);
  d["buffers"] = buffers;
  d["bytes"] = bytes;
  d["threadgroup_memory"] = plan.threadgroup_memory;
  d["elementwise_work_items"] = plan.elementwise_work_items;
  return d;
}

template <size_t n>
std::array<uint32_t, n> to_array(const py::handle& sequence) {
  std::array<uint32_t, n> out{};
  for (size_t i = 0; i < n; ++i) out[i] = py::cast<uint32_t>(py::reinterpret_borrow<py::sequence>(sequence)[i]);
  return out;
}

// The inverse of plan_to_python, for the functions below that take a plan.
metalq::DispatchPlan plan_from_python(const py::dict& d) {
  metalq::DispatchPlan plan;
  plan.kernel = py::cast<std::string>(d["kernel"]);
  plan.threadgroups = to_array<3>(d["threadgroups"]);
  plan.threads_per_threadgroup = to_array<3>(d["threads_per_threadgroup"]);
  for (const auto& b : py::reinterpret_borrow<py::list>(d["buffers"])) {
    const auto pair = py::reinterpret_borrow<py::tuple>(b);
    plan.buffers.push_back({py::cast<int>(pair[0]), py::cast<at::Tensor>(pair[1])});
  }
  for (const auto& b : py::reinterpret_borrow<py::list>(d["bytes"])) {
    const auto pair = py::reinterpret_borrow<py::tuple>(b);
    const std::string bytes = py::cast<std::string>(pair[1]);
    plan.bytes.push_back({py::cast<int>(pair[0]), std::vector<uint8_t>(bytes.begin(), bytes.end())});
  }
  plan.threadgroup_memory = py::cast<std::vector<std::pair<int, uint32_t>>>(d["threadgroup_memory"]);
  plan.elementwise_work_items = py::cast<uint64_t>(d["elementwise_work_items"]);
  return plan;
}

py::list plans_to_python(const std::vector<metalq::DispatchPlan>& plans) {
  py::list out;
  for (const auto& plan : plans) out.append(plan_to_python(plan));
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.def("cpu_kernel_isa", [] { return std::string(metalq::cpu::kernels().isa); },
        "The CPU kernel variant in use (METALQ_CPU_ISA overrides the choice by CPU features).");
  m.def("kernel_name", &metalq::kernel_name, "Host name of a Metal kernel (metal/quantized.metal).");
  m.def("fit_thread_limit", [](const py::dict& plan, uint64_t max_threads) {
    return plan_to_python(metalq::fit_thread_limit(plan_from_python(plan), max_threads));
  }, "The plan as the Mac encoder dispatches it on a pipeline allowing max_threads threads per threadgroup.");
  // Each plan_* validates like the op, then plans the dispatch for caller-allocated contiguous outputs.
  m.def("plan_affine_quantize", [](const at::Tensor& w, const at::Tensor& wq, const at::Tensor& scales,
                                   const at::Tensor& biases, int64_t group_size, int64_t bits) {
    metalq::check_affine_quantize(w, group_size, bits);
    return plan_to_python(metalq::plan_affine_quantize(w, wq, scales, biases, group_size, bits));
  });
  m.def("plan_affine_dequantize", [](const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& biases,
                                     const at::Tensor& out, int64_t group_size, int64_t bits) {
    metalq::check_affine_dequantize(wq, scales, biases, group_size, bits);
    return plan_to_python(metalq::plan_affine_dequantize(wq, scales, biases, out, group_size, bits));
  });
  m.def("bits_kernel_name", &metalq::bits_kernel_name, "Host name of a type-independent Metal kernel (pack, unpack).");
  m.def("plan_pack", [](const at::Tensor& q, const at::Tensor& w, int64_t bits) {
    metalq::check_pack(q, bits);
    return plan_to_python(metalq::plan_pack(q, w, bits));
  });
  m.def("plan_unpack", [](const at::Tensor& w, const at::Tensor& q, int64_t bits) {
    metalq::check_unpack(w, bits);
    return plan_to_python(metalq::plan_unpack(w, q, bits));
  });
  m.def("fp_kernel_name", &metalq::fp_kernel_name, "Host name of an fp-mode Metal kernel (mode: FpMode number).");
  m.def("plan_fp_quantize", [](const at::Tensor& w, const at::Tensor& wq, const at::Tensor& scales,
                               const std::string& mode_name, const std::optional<at::Tensor>& global_scale) {
    const int mode = metalq::check_fp_mode("fp_quantize", mode_name);
    metalq::check_fp_quantize(w, mode, global_scale);
    return plan_to_python(metalq::plan_fp_quantize(w, wq, scales, mode, global_scale));
  });
  m.def("plan_fp_dequantize", [](const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& out,
                                 const std::string& mode_name, const std::optional<at::Tensor>& global_scale) {
    const int mode = metalq::check_fp_mode("fp_dequantize", mode_name);
    metalq::check_fp_dequantize(wq, scales, mode, global_scale);
    return plan_to_python(metalq::plan_fp_dequantize(wq, scales, out, mode, global_scale));
  });
  m.def("plan_affine_qmm", [](const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                              const at::Tensor& biases, const at::Tensor& out, int64_t group_size, int64_t bits,
                              bool transpose) {
    metalq::check_affine_qmm("affine_qmm", x, w, scales, biases, group_size, bits, transpose);
    const auto operands = metalq::qmm_operands(x, w, scales, biases);
    return plans_to_python(
        metalq::plan_qmm(operands, out, metalq::WeightFormat::affine(group_size, bits), transpose));
  });
  m.def("plan_fp_qmm", [](const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                          const std::optional<at::Tensor>& global_scale, const at::Tensor& out,
                          const std::string& mode_name, bool transpose) {
    const char* op = transpose ? "fp_qmm_t" : "fp_qmm_n";
    const int mode = metalq::check_fp_mode(op, mode_name);
    metalq::check_fp_qmm(op, x, w, scales, mode, global_scale, transpose);
    const auto operands = metalq::fp_qmm_operands(x, w, scales, global_scale);
    return plans_to_python(
        metalq::plan_qmm(operands, out, metalq::WeightFormat::fp(mode, global_scale.has_value()), transpose));
  });
  m.def("plan_affine_gather_qmm", [](const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                                     const at::Tensor& biases, const std::optional<at::Tensor>& lhs_indices,
                                     const std::optional<at::Tensor>& rhs_indices, const at::Tensor& out,
                                     bool transpose, int64_t group_size, int64_t bits, bool sorted_indices) {
    const auto shape = metalq::check_affine_gather_qmm(x, w, scales, biases, lhs_indices, rhs_indices, group_size,
                                                       bits, transpose);
    const auto operands =
        metalq::gather_qmm_operands(shape, x, w, scales, biases, lhs_indices, rhs_indices, sorted_indices);
    return plans_to_python(metalq::plan_affine_gather_qmm(operands, out, group_size, bits, transpose));
  });
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
  m.def("affine_gather_qmm(Tensor x, Tensor w, Tensor scales, Tensor biases, Tensor? lhs_indices, "
        "Tensor? rhs_indices, bool transpose, int group_size, int bits, bool sorted_indices) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("fp_quantize(Tensor w, str mode, Tensor? global_scale=None) -> (Tensor, Tensor)", {at::Tag::pt2_compliant_tag});
  m.def("fp_dequantize(Tensor w, Tensor scales, str mode, Tensor? global_scale=None, ScalarType? dtype=None) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("fp_qmm_t(Tensor x, Tensor w, Tensor scales, str mode, Tensor? global_scale=None) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("fp_qmm_n(Tensor x, Tensor w, Tensor scales, str mode, Tensor? global_scale=None) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("pack(Tensor q, int bits) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("unpack(Tensor w, int bits) -> Tensor", {at::Tag::pt2_compliant_tag});
}
