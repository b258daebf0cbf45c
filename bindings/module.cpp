// bindings/module.cpp -- PYBIND11_MODULE(_C): argument validation and device dispatch only.
//
// Every function takes torch tensors, checks dtype / rank / contiguity / device (naming the argument, the
// expected and the actual value), and dispatches to the CPU core or the CUDA kernels on the tensors' device
// and the caller's current stream. Python-facing conveniences (dtype conversion, result objects) live in
// python/moequant/ops.py.
#include "checks.h"
#include "ops.h"

#include <moequant/hadamard.h>
#include <moequant/pack.h>
#include <moequant/quant.h>

#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <string>

namespace py = pybind11;
using moequant::QuantSpec;
using moequant::ScaleDtype;
using moequant::ScaleSearch;
namespace mb = moequant::bindings;

namespace {

[[noreturn]] void no_cuda(const char* name) {
  throw std::invalid_argument(fmt::format(
      "{}: tensor is on a CUDA device but this build of moequant has no CUDA kernels; rebuild with nvcc on "
      "PATH (MOEQUANT_CUDA=ON) or pass CPU tensors",
      name));
}

bool on_cuda(const at::Tensor& t, const char* name) {
  if (t.is_cuda()) {
#ifdef MOEQUANT_WITH_CUDA
    return true;
#else
    no_cuda(name);
#endif
  }
  if (!t.is_cpu())
    throw std::invalid_argument(fmt::format("{}: expected a CPU or CUDA tensor, got device {}", name, t.device().str()));
  return false;
}

// Rows of a 2-D tensor the kernels read through a row stride: unit stride inside a row, rows not overlapping.
void check_unit_stride_rows(const at::Tensor& t, const char* name) {
  if (t.stride(1) != 1 || t.stride(0) < t.size(1))
    throw std::invalid_argument(fmt::format("{}: expected rows with unit stride (call .contiguous()), got shape {}",
                                            name, mb::shape_str(t)));
}

void check_matrix_f32(const at::Tensor& w, const char* name) {
  mb::check_dim(w, name, 2);
  mb::check_dtype(w, name, at::kFloat);
  check_unit_stride_rows(w, name);
}

mb::QuantTensors quantize_rtn(const at::Tensor& w, const QuantSpec& spec) {
  check_matrix_f32(w, "w");
  if (on_cuda(w, "w")) {
#ifdef MOEQUANT_WITH_CUDA
    return mb::quantize_rtn_cuda(w, spec);
#endif
  }
  return mb::quantize_rtn_cpu(w, spec);
}

at::Tensor dequantize(const at::Tensor& codes, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                      const QuantSpec& spec) {
  mb::check_dim(codes, "codes", 2);
  mb::check_dtype(codes, "codes", at::kChar);
  mb::check_contiguous(codes, "codes");
  mb::check_dim(scales, "scale", 2);
  mb::check_dtype(scales, "scale", at::kFloat);
  mb::check_contiguous(scales, "scale");
  mb::check_same_device(scales, "scale", codes, "codes");
  moequant::bindings::throw_if_error(moequant::validate(spec, codes.size(1)));
  const int64_t groups = moequant::num_groups(spec, codes.size(1));
  mb::check_size(scales, "scale", 0, codes.size(0));
  mb::check_size(scales, "scale", 1, groups);
  if (zeros) {
    mb::check_dtype(*zeros, "zero_point", at::kInt);
    mb::check_contiguous(*zeros, "zero_point");
    mb::check_same_device(*zeros, "zero_point", codes, "codes");
    mb::check_dim(*zeros, "zero_point", 2);
    mb::check_size(*zeros, "zero_point", 0, codes.size(0));
    mb::check_size(*zeros, "zero_point", 1, groups);
  }
  const at::Tensor* zp = zeros ? &*zeros : nullptr;
  if (on_cuda(codes, "codes")) {
#ifdef MOEQUANT_WITH_CUDA
    return mb::dequantize_cuda(codes, scales, zp, spec);
#endif
  }
  return mb::dequantize_cpu(codes, scales, zp, spec);
}

at::Tensor pack_rows(const at::Tensor& q, int bits, const std::optional<at::Tensor>& host_flag) {
  mb::check_dim(q, "q", 2);
  mb::check_dtype(q, "q", at::kChar);
  mb::check_contiguous(q, "q");
  if (on_cuda(q, "q")) {
#ifdef MOEQUANT_WITH_CUDA
    return mb::pack_rows_cuda(q, bits, host_flag ? &*host_flag : nullptr);
#endif
  }
  return mb::pack_rows_cpu(q, bits);
}

at::Tensor unpack_rows(const at::Tensor& packed, int bits, int64_t cols) {
  mb::check_dim(packed, "packed", 2);
  mb::check_dtype(packed, "packed", at::kInt);
  mb::check_contiguous(packed, "packed");
  if (bits < moequant::kMinBits || bits > moequant::kMaxBits)
    throw std::invalid_argument(fmt::format("bits: expected an integer in [{}, {}], got {}", moequant::kMinBits,
                                            moequant::kMaxBits, bits));
  if (cols < 0) throw std::invalid_argument(fmt::format("in_features: expected >= 0, got {}", cols));
  const int64_t words = moequant::packed_words(cols, bits);
  if (packed.size(1) != words)
    throw std::invalid_argument(fmt::format(
        "in_features: expected a value whose packing at {} bits takes {} int32 words per row (packed has that "
        "width), got {} which takes {}",
        bits, packed.size(1), cols, words));
  if (on_cuda(packed, "packed")) {
#ifdef MOEQUANT_WITH_CUDA
    return mb::unpack_rows_cuda(packed, bits, cols);
#endif
  }
  return mb::unpack_rows_cpu(packed, bits, cols);
}

void accumulate_hessian(at::Tensor H, at::Tensor counts, at::Tensor mass, const at::Tensor& x, const at::Tensor& ids,
                        const std::optional<at::Tensor>& weights, int precision, bool symmetrize) {
  if (precision < 0 || precision > 2)
    throw std::invalid_argument(fmt::format("precision: expected 0 (fp32), 1 (tf32) or 2 (bf16), got {}", precision));
  mb::check_dim(H, "hessians", 3);
  if (H.scalar_type() != at::kFloat && H.scalar_type() != at::kDouble)
    throw std::invalid_argument(
        fmt::format("hessians: expected dtype float32 or float64, got {}", mb::dtype_str(H.scalar_type())));
  mb::check_contiguous(H, "hessians");
  const int64_t experts = H.size(0), dim = H.size(1);
  mb::check_size(H, "hessians", 2, dim);
  mb::check_dim(counts, "counts", 1);
  mb::check_dtype(counts, "counts", at::kLong);
  mb::check_size(counts, "counts", 0, experts);
  mb::check_dim(mass, "mass", 1);
  mb::check_dtype(mass, "mass", at::kDouble);
  mb::check_size(mass, "mass", 0, experts);
  mb::check_dim(x, "x", 2);
  const bool x_cuda = x.is_cuda();
  if (x.scalar_type() != at::kFloat &&
      !(x_cuda && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf)))
    throw std::invalid_argument(fmt::format(
        "x: expected dtype float32{}, got {}", x_cuda ? ", bfloat16 or float16" : " (16-bit rows only on CUDA)",
        mb::dtype_str(x.scalar_type())));
  check_unit_stride_rows(x, "x");
  mb::check_size(x, "x", 1, dim);
  mb::check_dim(ids, "expert_ids", 1);
  mb::check_dtype(ids, "expert_ids", at::kInt);
  mb::check_contiguous(ids, "expert_ids");
  mb::check_size(ids, "expert_ids", 0, x.size(0));
  for (auto [t, name] : {std::pair<const at::Tensor*, const char*>{&counts, "counts"}, {&mass, "mass"},
                         {&x, "x"}, {&ids, "expert_ids"}})
    mb::check_same_device(*t, name, H, "hessians");
  if (weights) {
    mb::check_dim(*weights, "weights", 1);
    mb::check_dtype(*weights, "weights", at::kFloat);
    mb::check_contiguous(*weights, "weights");
    mb::check_size(*weights, "weights", 0, x.size(0));
    mb::check_same_device(*weights, "weights", H, "hessians");
  }
  const at::Tensor* wp = weights ? &*weights : nullptr;
  if (on_cuda(H, "hessians")) {
#ifdef MOEQUANT_WITH_CUDA
    mb::accumulate_hessian_cuda(H, counts, mass, x, ids, wp, precision, symmetrize);
    return;
#endif
  }
  if (precision != 0)
    throw std::invalid_argument(
        fmt::format("precision: expected 0 (fp32) for CPU accumulators (tf32 / bf16 need CUDA tensors), got {}",
                    precision));
  mb::accumulate_hessian_cpu(H, counts, mass, x, ids, wp);  // always symmetric on the CPU
}

/// Completes CUDA accumulations made with symmetrize=False (a no-op for CPU tensors, which are always symmetric).
void hessian_symmetrize(at::Tensor H) {
  mb::check_dim(H, "hessians", 3);
  mb::check_contiguous(H, "hessians");
  mb::check_size(H, "hessians", 2, H.size(1));
  if (on_cuda(H, "hessians")) {
#ifdef MOEQUANT_WITH_CUDA
    mb::hessian_symmetrize_cuda(H);
#endif
  }
}

py::tuple gptq(const at::Tensor& w, const at::Tensor& h, const QuantSpec& spec, bool act_order, double damp,
               int64_t block_size) {
  check_matrix_f32(w, "w");
  mb::check_dim(h, "h", 2);
  if (h.scalar_type() != at::kFloat && h.scalar_type() != at::kDouble)
    throw std::invalid_argument(
        fmt::format("h: expected dtype float32 or float64, got {}", mb::dtype_str(h.scalar_type())));
  if (h.size(0) != w.size(1) || h.size(1) != w.size(1))
    throw std::invalid_argument(fmt::format("h: expected shape [{}, {}] (in_features of w), got {}", w.size(1),
                                            w.size(1), mb::shape_str(h)));
  if (h.stride(1) != 1) throw std::invalid_argument("h: expected rows with unit stride (call .contiguous())");
  if (w.is_cuda() || h.is_cuda())
    throw std::invalid_argument("w: the GPTQ solver of this build runs on the CPU; pass CPU tensors");
  mb::GptqOptions opt{act_order, damp, block_size};
  auto [t, info] = mb::gptq_cpu(w, h, spec, opt);
  py::dict d;
  d["loss"] = info.loss;
  d["damp"] = info.damp_fraction;
  d["damp_value"] = info.damp_value;
  d["escalations"] = info.escalations;
  d["dead_columns"] = info.dead_columns;
  return py::make_tuple(std::get<0>(t), std::get<1>(t), std::get<2>(t), std::get<3>(t), d);
}

// The test-only cap of the CUDA kernels' shared memory per block (kernels.h: 0 = the device's limit); negative values
// cannot reach the size_t of the kernels.
size_t shared_memory_cap(int64_t max_shared_memory_bytes) {
  if (max_shared_memory_bytes < 0)
    throw std::invalid_argument(fmt::format(
        "max_shared_memory_bytes: expected 0 (the device's limit) or a byte count >= 49152, got {}",
        max_shared_memory_bytes));
  return static_cast<size_t>(max_shared_memory_bytes);
}

py::tuple gptq_batched(const at::Tensor& w, const at::Tensor& h, const QuantSpec& spec, bool act_order, double damp,
                       int64_t block_size, bool compute_loss, bool overwrite_h, int64_t max_shared_memory_bytes) {
  mb::check_dim(w, "w", 3);
  mb::check_dtype(w, "w", at::kFloat);
  mb::check_contiguous(w, "w");
  mb::check_dim(h, "h", 3);
  mb::check_dtype(h, "h", at::kFloat);
  mb::check_contiguous(h, "h");
  if (h.size(0) != w.size(0) || h.size(1) != w.size(2) || h.size(2) != w.size(2))
    throw std::invalid_argument(fmt::format("h: expected shape [{}, {}, {}] (experts and in_features of w), got {}",
                                            w.size(0), w.size(2), w.size(2), mb::shape_str(h)));
  mb::check_same_device(h, "h", w, "w");
  [[maybe_unused]] const size_t smem_cap = shared_memory_cap(max_shared_memory_bytes);
  if (!on_cuda(w, "w"))
    throw std::invalid_argument("w: the batched GPTQ runs on CUDA tensors (use moequant.ops.gptq_quantize_batched, "
                                "which loops over the CPU solver for CPU tensors)");
#ifdef MOEQUANT_WITH_CUDA
  mb::GptqOptions opt{act_order, damp, block_size};
  auto [codes, scales, zeros, deq, losses, esc] =
      mb::gptq_batched_cuda(w, h, spec, opt, compute_loss, overwrite_h, smem_cap);
  return py::make_tuple(codes, scales, zeros, deq, losses, esc);
#else
  return py::tuple();
#endif
}

at::Tensor hadamard(const at::Tensor& x, int64_t max_shared_memory_bytes) {
  if (x.dim() < 1) throw std::invalid_argument("x: expected a tensor with at least one dimension, got a scalar");
  if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kBFloat16 && x.scalar_type() != at::kHalf)
    throw std::invalid_argument(fmt::format("x: expected dtype float32, bfloat16 or float16, got {}",
                                            mb::dtype_str(x.scalar_type())));
  mb::check_contiguous(x, "x");
  const int64_t n = x.size(-1);
  if (!moequant::hadamard_supported(n))
    throw std::invalid_argument(fmt::format("x: expected a last dimension of {}, got {}",
                                            moequant::hadamard_supported_text(), n));
  [[maybe_unused]] const size_t smem_cap = shared_memory_cap(max_shared_memory_bytes);
  if (on_cuda(x, "x")) {
#ifdef MOEQUANT_WITH_CUDA
    return mb::hadamard_cuda(x, smem_cap);
#endif
  }
  return mb::hadamard_cpu(x);
}

py::tuple greedy_rounding(const at::Tensor& w, const at::Tensor& h, const at::Tensor& codes, const at::Tensor& scales,
                          const std::optional<at::Tensor>& zeros, const QuantSpec& spec, int passes,
                          double outlier_quantile) {
  check_matrix_f32(w, "w");
  mb::check_contiguous(w, "w");
  mb::check_dim(h, "h", 2);
  if (h.scalar_type() != at::kFloat && h.scalar_type() != at::kDouble)
    throw std::invalid_argument(
        fmt::format("h: expected dtype float32 or float64, got {}", mb::dtype_str(h.scalar_type())));
  if (h.size(0) != w.size(1) || h.size(1) != w.size(1) || h.stride(1) != 1)
    throw std::invalid_argument(fmt::format("h: expected shape [{}, {}] with unit column stride, got {}", w.size(1),
                                            w.size(1), mb::shape_str(h)));
  mb::check_dtype(codes, "codes", at::kChar);
  mb::check_contiguous(codes, "codes");
  if (codes.dim() != 2 || codes.size(0) != w.size(0) || codes.size(1) != w.size(1))
    throw std::invalid_argument(fmt::format("codes: expected shape [{}, {}], got {}", w.size(0), w.size(1),
                                            mb::shape_str(codes)));
  const int64_t ng = moequant::num_groups(spec, w.size(1));
  for (auto [t, name, dt] : {std::tuple<const at::Tensor*, const char*, at::ScalarType>{&scales, "scale", at::kFloat},
                             {zeros ? &*zeros : nullptr, "zero_point", at::kInt}}) {
    if (t == nullptr) continue;
    mb::check_dtype(*t, name, dt);
    mb::check_contiguous(*t, name);
    if (t->dim() != 2 || t->size(0) != w.size(0) || t->size(1) != ng)
      throw std::invalid_argument(fmt::format("{}: expected shape [{}, {}], got {}", name, w.size(0), ng,
                                              mb::shape_str(*t)));
  }
  for (const at::Tensor* t : {&w, &h, &codes, &scales})
    if (!t->is_cpu()) throw std::invalid_argument("greedy_rounding: runs on the CPU; pass CPU tensors");
  auto [q, deq, info] = mb::greedy_rounding_cpu(w, h, codes, scales, zeros ? &*zeros : nullptr, spec, passes,
                                                outlier_quantile);
  py::dict d;
  d["loss_before"] = info.loss_before;
  d["loss_after"] = info.loss_after;
  d["flips"] = info.flips;
  d["excluded"] = info.excluded;
  d["rows_reverted"] = info.rows_reverted;
  return py::make_tuple(q, deq, d);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "moequant C++/CUDA extension (use moequant.ops, which validates and converts arguments)";

  py::enum_<ScaleDtype>(m, "ScaleDtype")
      .value("float32", ScaleDtype::kFloat32)
      .value("bfloat16", ScaleDtype::kBFloat16)
      .value("float16", ScaleDtype::kFloat16);
  py::enum_<ScaleSearch>(m, "ScaleSearch").value("minmax", ScaleSearch::kMinMax).value("mse", ScaleSearch::kMse);

  py::class_<QuantSpec>(m, "QuantSpec")
      .def(py::init([](int bits, int64_t group_size, bool symmetric, ScaleDtype scale_dtype, ScaleSearch search,
                       int mse_grid, double mse_min_shrink, double mse_norm) {
             QuantSpec s;
             s.bits = bits;
             s.group_size = group_size;
             s.symmetric = symmetric;
             s.scale_dtype = scale_dtype;
             s.search = search;
             s.mse_grid = mse_grid;
             s.mse_min_shrink = mse_min_shrink;
             s.mse_norm = mse_norm;
             mb::throw_if_error(moequant::validate(s));
             return s;
           }),
           py::arg("bits") = 4, py::arg("group_size") = 128, py::arg("symmetric") = false,
           py::arg("scale_dtype") = ScaleDtype::kFloat32, py::arg("search") = ScaleSearch::kMinMax,
           py::arg("mse_grid") = 100, py::arg("mse_min_shrink") = 0.2, py::arg("mse_norm") = 2.4)
      .def_readonly("bits", &QuantSpec::bits)
      .def_readonly("group_size", &QuantSpec::group_size)
      .def_readonly("symmetric", &QuantSpec::symmetric)
      .def_readonly("scale_dtype", &QuantSpec::scale_dtype)
      .def_readonly("search", &QuantSpec::search);

  m.def("cuda_compiled", []() {
#ifdef MOEQUANT_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("quantize_rtn", &quantize_rtn, py::arg("w"), py::arg("spec"),
        "RTN quantization of a float32 [out, in] matrix -> (codes int8, scale f32, zero int32, dequantized f32)");
  m.def("dequantize", &dequantize, py::arg("codes"), py::arg("scale"), py::arg("zero_point"), py::arg("spec"));
  m.def("pack_rows", &pack_rows, py::arg("q"), py::arg("bits"), py::arg("host_flag") = py::none(),
        "pack-quantized int32 packing along the last dimension; host_flag (CUDA only, optional): a caller-owned "
        "pinned CPU tensor of >= 4 bytes for the out-of-range flag (default: one from torch's pinned-memory cache)");
  m.def("unpack_rows", &unpack_rows, py::arg("packed"), py::arg("bits"), py::arg("in_features"));
  m.def("accumulate_hessian", &accumulate_hessian, py::arg("hessians"), py::arg("counts"), py::arg("mass"),
        py::arg("x"), py::arg("expert_ids"), py::arg("weights"), py::arg("precision") = 0,
        py::arg("symmetrize") = true,
        "H[e] += sum c x x^T over rows routed to e (in place), counts and mass updated; precision (CUDA only): "
        "0 fp32, 1 tf32 tensor cores, 2 bf16 inputs with fp32 accumulation; symmetrize=False (CUDA) updates only "
        "the row-major upper triangle, hessian_symmetrize completes it");
  m.def("hessian_symmetrize", &hessian_symmetrize, py::arg("hessians"),
        "copies the row-major upper triangle of every [d, d] slice onto the lower one (CUDA; no-op on the CPU)");
  m.def("gptq", &gptq, py::arg("w"), py::arg("h"), py::arg("spec"), py::arg("act_order"), py::arg("damp"),
        py::arg("block_size"), "GPTQ on the CPU -> (codes, scale, zero, dequantized, info dict)");
  m.def("gptq_batched", &gptq_batched, py::arg("w"), py::arg("h"), py::arg("spec"), py::arg("act_order"),
        py::arg("damp"), py::arg("block_size"), py::arg("compute_loss") = true, py::arg("overwrite_h") = false,
        py::arg("max_shared_memory_bytes") = 0,
        "batched GPTQ of E experts on CUDA: w [E, out, in], h [E, in, in] float32 -> (codes, scale, zero, "
        "dequantized, losses f64 [E], escalations int32 [E]); max_shared_memory_bytes (tests): caps the kernels' "
        "shared memory per block below the device's limit (0: the device's; else >= 49152) to run the "
        "small-memory configurations, with bit-identical results");
  m.def("greedy_rounding", &greedy_rounding, py::arg("w"), py::arg("h"), py::arg("codes"), py::arg("scale"),
        py::arg("zero_point"), py::arg("spec"), py::arg("passes") = 1, py::arg("outlier_quantile") = 0.99,
        "greedy rounding correction on the CPU -> (codes int8, dequantized f32, info dict)");
  m.def("hadamard", &hadamard, py::arg("x"), py::arg("max_shared_memory_bytes") = 0,
        "orthonormal Hadamard transform along the last dimension (CPU or CUDA; float32/bfloat16/float16); "
        "max_shared_memory_bytes (tests, CUDA only; ignored on the CPU): caps the kernel's shared memory per block "
        "(0: the device's limit; else >= 49152), with bit-identical results");
}
