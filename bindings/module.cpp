// bindings/module.cpp -- PYBIND11_MODULE(_C): argument validation and device dispatch only.
//
// Every function takes torch tensors, checks dtype / rank / contiguity / device (naming the argument, the
// expected and the actual value), and dispatches to the CPU core or the CUDA kernels on the tensors' device
// and the caller's current stream. Python-facing conveniences (dtype conversion, result objects) live in
// python/moequant/ops.py.
#include "checks.h"
#include "ops.h"

#include <moequant/format.h>
#include <moequant/hadamard.h>
#include <moequant/pack.h>
#include <moequant/quant.h>

#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <string>
#include <vector>

namespace py = pybind11;
using moequant::ElementKind;
using moequant::Format;
using moequant::GroupKind;
using moequant::QuantSpec;
using moequant::ScaleKind;
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


// ---- formats (moequant/format.h) ----------------------------------------------------------------------------------

void check_2d_dtype(const at::Tensor& t, const char* name, at::ScalarType dt) {
  mb::check_dim(t, name, 2);
  mb::check_dtype(t, name, dt);
}

/// A float32 tensor of one element on `ref`'s device (the global scale).
void check_global_scale_tensor(const at::Tensor& g, const at::Tensor& ref, const char* ref_name) {
  mb::check_dtype(g, "global_scale", at::kFloat);
  if (g.numel() != 1)
    throw std::invalid_argument(
        fmt::format("global_scale: expected a tensor of one element, got shape {}", mb::shape_str(g)));
  mb::check_contiguous(g, "global_scale");
  mb::check_same_device(g, "global_scale", ref, ref_name);
}

void check_out_dtype(ScaleDtype d) {
  if (d != ScaleDtype::kFloat32 && d != ScaleDtype::kBFloat16)
    throw std::invalid_argument(
        fmt::format("out_dtype: expected ScaleDtype.float32 or ScaleDtype.bfloat16, got {}", static_cast<int>(d)));
}

py::tuple format_quantize(const at::Tensor& w, const Format& f, const std::optional<at::Tensor>& global_scale,
                          bool dequantized) {
  mb::check_dim(w, "w", 2);
  if (w.scalar_type() != at::kFloat && w.scalar_type() != at::kBFloat16 && w.scalar_type() != at::kHalf)
    throw std::invalid_argument(fmt::format("w: expected dtype float32, bfloat16 or float16, got {}",
                                            mb::dtype_str(w.scalar_type())));
  if (w.size(0) > 0 && w.size(1) > 0) check_unit_stride_rows(w, "w");
  mb::throw_if_error(moequant::validate(f, w.size(0), w.size(1)));
  if (global_scale) {
    if (!f.global_scale)
      throw std::invalid_argument("global_scale: expected None for a format without a global scale, got a tensor");
    check_global_scale_tensor(*global_scale, w, "w");
  }
  const at::Tensor* gp = global_scale ? &*global_scale : nullptr;
  mb::FormatTensors t;
  if (on_cuda(w, "w")) {
#ifdef MOEQUANT_WITH_CUDA
    t = mb::format_quantize_cuda(w, f, gp, dequantized);
#endif
  } else {
    t = mb::format_quantize_cpu(w, f, gp, dequantized);
  }
  return py::make_tuple(std::get<0>(t), std::get<1>(t), std::get<2>(t), std::get<3>(t), std::get<4>(t),
                        std::get<5>(t));
}

at::Tensor format_dequantize(const at::Tensor& codes, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                             const std::optional<at::Tensor>& global_scale, const Format& f, ScaleDtype out_dtype) {
  check_2d_dtype(codes, "codes", at::kByte);
  mb::check_contiguous(codes, "codes");
  mb::throw_if_error(moequant::validate(f, codes.size(0), codes.size(1)));
  check_out_dtype(out_dtype);
  const int64_t sr = moequant::scale_rows(f, codes.size(0)), sc = moequant::scale_cols(f, codes.size(1));
  check_2d_dtype(scales, "scales", at::kFloat);
  mb::check_contiguous(scales, "scales");
  mb::check_same_device(scales, "scales", codes, "codes");
  if (scales.size(0) != sr || scales.size(1) != sc)
    throw std::invalid_argument(fmt::format("scales: expected shape [{}, {}] ({} scales of a [{}, {}] weight), got {}",
                                            sr, sc, moequant::group_kind_name(f.group), codes.size(0), codes.size(1),
                                            mb::shape_str(scales)));
  if (zeros) {
    if (f.element != ElementKind::kInt || f.symmetric)
      throw std::invalid_argument("zeros: expected None for a format without zero points (only asymmetric int), got "
                                  "a tensor");
    check_2d_dtype(*zeros, "zeros", at::kInt);
    mb::check_contiguous(*zeros, "zeros");
    mb::check_same_device(*zeros, "zeros", codes, "codes");
    if (zeros->size(0) != sr || zeros->size(1) != sc)
      throw std::invalid_argument(
          fmt::format("zeros: expected shape [{}, {}], got {}", sr, sc, mb::shape_str(*zeros)));
  }
  if (f.global_scale && !global_scale)
    throw std::invalid_argument("global_scale: expected a float32 tensor of one element for a format with a global "
                                "scale, got None");
  if (!f.global_scale && global_scale)
    throw std::invalid_argument("global_scale: expected None for a format without a global scale, got a tensor");
  if (global_scale) check_global_scale_tensor(*global_scale, codes, "codes");
  const at::Tensor* zp = zeros ? &*zeros : nullptr;
  const at::Tensor* gp = global_scale ? &*global_scale : nullptr;
  if (on_cuda(codes, "codes")) {
#ifdef MOEQUANT_WITH_CUDA
    return mb::format_dequantize_cuda(codes, scales, zp, gp, f, out_dtype);
#endif
  }
  return mb::format_dequantize_cpu(codes, scales, zp, gp, f, out_dtype);
}

void check_fp_element(ElementKind k) {
  const int v = static_cast<int>(k);
  if (v < 1 || v > 4)
    throw std::invalid_argument(fmt::format(
        "element: expected ElementKind.fp8_e4m3, fp4_e2m1, fp6_e2m3 or fp6_e3m2 (int codes use pack_rows), got {}", v));
}

at::Tensor pack_fp_codes(const at::Tensor& codes, ElementKind element) {
  check_fp_element(element);
  check_2d_dtype(codes, "codes", at::kByte);
  mb::check_contiguous(codes, "codes");
  if (on_cuda(codes, "codes")) {
#ifdef MOEQUANT_WITH_CUDA
    return mb::pack_fp_codes_cuda(codes, element);
#endif
  }
  return mb::pack_fp_codes_cpu(codes, element);
}

at::Tensor unpack_fp_codes(const at::Tensor& packed, ElementKind element, int64_t cols) {
  check_fp_element(element);
  check_2d_dtype(packed, "packed", at::kByte);
  mb::check_contiguous(packed, "packed");
  if (cols < 0) throw std::invalid_argument(fmt::format("cols: expected >= 0, got {}", cols));
  const int64_t pb = moequant::packed_row_bytes(element, cols);
  if (packed.size(1) != pb)
    throw std::invalid_argument(fmt::format(
        "cols: expected a value whose {} packing takes {} bytes per row (packed has that width), got {} which takes {}",
        moequant::element_kind_name(element), packed.size(1), cols, pb));
  if (on_cuda(packed, "packed")) {
#ifdef MOEQUANT_WITH_CUDA
    return mb::unpack_fp_codes_cuda(packed, element, cols);
#endif
  }
  return mb::unpack_fp_codes_cpu(packed, element, cols);
}

at::Tensor decode_fp8_block_scaled(const at::Tensor& weight, const at::Tensor& scale_inv, int64_t block_rows,
                                   int64_t block_cols, ScaleDtype out_dtype) {
  mb::check_dim(weight, "weight", 2);
  if (weight.scalar_type() != at::kFloat8_e4m3fn && weight.scalar_type() != at::kByte)
    throw std::invalid_argument(fmt::format("weight: expected dtype float8_e4m3fn (or its uint8 view), got {}",
                                            mb::dtype_str(weight.scalar_type())));
  mb::check_contiguous(weight, "weight");
  check_out_dtype(out_dtype);
  if (block_rows <= 0 || block_cols <= 0)
    throw std::invalid_argument(
        fmt::format("block_size: expected two values > 0, got [{}, {}]", block_rows, block_cols));
  const int64_t sr = (weight.size(0) + block_rows - 1) / block_rows, sc = (weight.size(1) + block_cols - 1) / block_cols;
  check_2d_dtype(scale_inv, "weight_scale_inv", at::kFloat);
  mb::check_contiguous(scale_inv, "weight_scale_inv");
  mb::check_same_device(scale_inv, "weight_scale_inv", weight, "weight");
  if (scale_inv.size(0) != sr || scale_inv.size(1) != sc)
    throw std::invalid_argument(fmt::format(
        "weight_scale_inv: expected shape [{}, {}] (ceil of weight {} / [{}, {}]), got {}", sr, sc,
        mb::shape_str(weight), block_rows, block_cols, mb::shape_str(scale_inv)));
  const at::Tensor w8 = weight.scalar_type() == at::kByte ? weight : weight.view(at::kByte);
  if (on_cuda(weight, "weight")) {
#ifdef MOEQUANT_WITH_CUDA
    return mb::decode_fp8_block_scaled_cuda(w8, scale_inv, block_rows, block_cols, out_dtype);
#endif
  }
  return mb::decode_fp8_block_scaled_cpu(w8, scale_inv, block_rows, block_cols, out_dtype);
}

at::Tensor decode_mxfp4_blocks(const at::Tensor& blocks, const at::Tensor& scales, ScaleDtype out_dtype) {
  if (blocks.dim() < 2 || blocks.size(-1) != 16)
    throw std::invalid_argument(
        fmt::format("blocks: expected shape [..., groups, 16], got {}", mb::shape_str(blocks)));
  mb::check_dtype(blocks, "blocks", at::kByte);
  mb::check_contiguous(blocks, "blocks");
  mb::check_dtype(scales, "scales", at::kByte);
  mb::check_contiguous(scales, "scales");
  mb::check_same_device(scales, "scales", blocks, "blocks");
  check_out_dtype(out_dtype);
  const auto lead = blocks.sizes().slice(0, blocks.dim() - 1);
  if (scales.sizes() != lead)
    throw std::invalid_argument(fmt::format("scales: expected shape {} (blocks' shape without the last 16), got {}",
                                            mb::shape_str(blocks.select(-1, 0)), mb::shape_str(scales)));
  const int64_t groups = blocks.size(-2), rows = groups > 0 ? blocks.numel() / (16 * groups) : 0;
  const at::Tensor b3 = blocks.reshape({rows, groups, 16});
  const at::Tensor s2 = scales.reshape({rows, groups});
  std::vector<int64_t> out_shape(lead.begin(), lead.end());
  out_shape.back() = groups * 32;
  at::Tensor out;
  if (on_cuda(blocks, "blocks")) {
#ifdef MOEQUANT_WITH_CUDA
    out = mb::decode_mxfp4_blocks_cuda(b3, s2, out_dtype);
#endif
  } else {
    out = mb::decode_mxfp4_blocks_cpu(b3, s2, out_dtype);
  }
  return out.reshape(out_shape);
}

at::Tensor encode_elements(const at::Tensor& x, ElementKind element) {
  check_fp_element(element);
  mb::check_dtype(x, "x", at::kFloat);
  mb::check_contiguous(x, "x");
  if (!x.is_cpu()) throw std::invalid_argument("x: expected a CPU tensor (the codec functions are CPU-only)");
  return mb::encode_elements_cpu(x, element);
}

at::Tensor decode_elements(const at::Tensor& codes, ElementKind element) {
  check_fp_element(element);
  mb::check_dtype(codes, "codes", at::kByte);
  mb::check_contiguous(codes, "codes");
  if (!codes.is_cpu()) throw std::invalid_argument("codes: expected a CPU tensor (the codec functions are CPU-only)");
  return mb::decode_elements_cpu(codes, element);
}

// ---- GPTQ in any format (moequant/gptq_format.h, kernels.h cuda_gptq_batched_format) ------------------------------

py::dict gptq_info_dict(const mb::GptqInfo& info, bool with_loss) {
  py::dict d;
  if (with_loss) d["loss"] = info.loss;
  d["damp"] = info.damp_fraction;
  d["damp_value"] = info.damp_value;
  d["escalations"] = info.escalations;
  d["dead_columns"] = info.dead_columns;
  return d;
}

void check_hessian_2d(const at::Tensor& h, int64_t cols) {
  mb::check_dim(h, "h", 2);
  if (h.scalar_type() != at::kFloat && h.scalar_type() != at::kDouble)
    throw std::invalid_argument(
        fmt::format("h: expected dtype float32 or float64, got {}", mb::dtype_str(h.scalar_type())));
  if (h.size(0) != cols || h.size(1) != cols)
    throw std::invalid_argument(
        fmt::format("h: expected shape [{}, {}] (in_features of w), got {}", cols, cols, mb::shape_str(h)));
  if (h.stride(1) != 1) throw std::invalid_argument("h: expected rows with unit stride (call .contiguous())");
}

py::tuple gptq_format(const at::Tensor& w, const at::Tensor& h, const Format& f,
                      const std::optional<at::Tensor>& global_scale, bool act_order, double damp, int64_t block_size) {
  check_matrix_f32(w, "w");
  check_hessian_2d(h, w.size(1));
  mb::throw_if_error(moequant::validate(f, w.size(0), w.size(1)));
  if (global_scale) {
    if (!f.global_scale)
      throw std::invalid_argument("global_scale: expected None for a format without a global scale, got a tensor");
    check_global_scale_tensor(*global_scale, w, "w");
  }
  if (w.is_cuda() || h.is_cuda())
    throw std::invalid_argument("w: the GPTQ solver of gptq_format runs on the CPU; pass CPU tensors (the batched "
                                "CUDA solver is gptq_format_batched)");
  mb::check_same_device(h, "h", w, "w");
  mb::GptqOptions opt{act_order, damp, block_size};
  auto [t, info] = mb::gptq_format_cpu(w, h, f, global_scale ? &*global_scale : nullptr, opt);
  return py::make_tuple(std::get<0>(t), std::get<1>(t), std::get<2>(t), std::get<3>(t), std::get<4>(t),
                        std::get<5>(t), gptq_info_dict(info, true));
}

py::tuple gptq_factor(const at::Tensor& h, bool act_order, double damp) {
  mb::check_dim(h, "h", 2);
  check_hessian_2d(h, h.size(0));
  if (!h.is_cpu()) throw std::invalid_argument("h: expected a CPU tensor (gptq_factor is the CPU solvers' factor)");
  auto [u, perm, info] = mb::gptq_factor_cpu(h, act_order, damp);
  return py::make_tuple(u, perm, gptq_info_dict(info, false));
}

py::tuple gptq_format_batched(const at::Tensor& w, const at::Tensor& h, const Format& f,
                              const std::optional<at::Tensor>& global_scales, bool act_order, double damp,
                              int64_t block_size, bool compute_loss, bool overwrite_h,
                              int64_t max_shared_memory_bytes) {
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
  mb::throw_if_error(moequant::validate(f, w.size(1), w.size(2)));
  if (global_scales) {
    if (!f.global_scale)
      throw std::invalid_argument("global_scale: expected None for a format without a global scale, got a tensor");
    mb::check_dtype(*global_scales, "global_scale", at::kFloat);
    mb::check_contiguous(*global_scales, "global_scale");
    mb::check_same_device(*global_scales, "global_scale", w, "w");
    if (global_scales->dim() != 1 || global_scales->size(0) != w.size(0))
      throw std::invalid_argument(fmt::format("global_scale: expected shape [{}] (one per expert), got {}", w.size(0),
                                              mb::shape_str(*global_scales)));
  }
  [[maybe_unused]] const size_t smem_cap = shared_memory_cap(max_shared_memory_bytes);
  if (!on_cuda(w, "w"))
    throw std::invalid_argument("w: the batched GPTQ runs on CUDA tensors (use moequant.ops.gptq_quantize_format_batched, "
                                "which loops over the CPU solver for CPU tensors)");
#ifdef MOEQUANT_WITH_CUDA
  mb::GptqOptions opt{act_order, damp, block_size};
  auto t = mb::gptq_format_batched_cuda(w, h, f, global_scales ? &*global_scales : nullptr, opt, compute_loss,
                                        overwrite_h, smem_cap);
  return py::make_tuple(std::get<0>(t), std::get<1>(t), std::get<2>(t), std::get<3>(t), std::get<4>(t),
                        std::get<5>(t), std::get<6>(t), std::get<7>(t));
#else
  return py::tuple();
#endif
}

py::tuple format_scale_shape(const Format& f, int64_t rows, int64_t cols) {
  mb::throw_if_error(moequant::validate(f, rows, cols));
  return py::make_tuple(moequant::scale_rows(f, rows), moequant::scale_cols(f, cols));
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
  // ---- formats (moequant/format.h) ------------------------------------------------------------------------------
  py::enum_<ElementKind>(m, "ElementKind")
      .value("int", ElementKind::kInt)
      .value("fp8_e4m3", ElementKind::kFp8E4M3)
      .value("fp4_e2m1", ElementKind::kFp4E2M1)
      .value("fp6_e2m3", ElementKind::kFp6E2M3)
      .value("fp6_e3m2", ElementKind::kFp6E3M2);
  py::enum_<GroupKind>(m, "GroupKind")
      .value("tensor", GroupKind::kTensor)
      .value("channel", GroupKind::kChannel)
      .value("group", GroupKind::kGroup)
      .value("block", GroupKind::kBlock);
  py::enum_<ScaleKind>(m, "ScaleKind")
      .value("float", ScaleKind::kFloat)
      .value("fp8_e4m3", ScaleKind::kFp8E4M3)
      .value("e8m0", ScaleKind::kE8M0);
  auto checked = [](Format f) {
    mb::throw_if_error(moequant::validate(f));
    return f;
  };
  py::class_<Format>(m, "Format")
      .def(py::init([checked](ElementKind element, int bits, bool symmetric, GroupKind group, int64_t group_size,
                              int64_t block_rows, int64_t block_cols, ScaleKind scale, ScaleDtype scale_dtype,
                              bool global_scale) {
             Format f;
             f.element = element;
             f.bits = bits > 0 ? bits : f.element_bits();
             f.symmetric = symmetric;
             f.group = group;
             f.group_size = group_size;
             f.block_rows = block_rows;
             f.block_cols = block_cols;
             f.scale = scale;
             f.scale_dtype = scale_dtype;
             f.global_scale = global_scale;
             return checked(f);
           }),
           py::arg("element"), py::arg("bits") = 0, py::arg("symmetric") = true, py::arg("group") = GroupKind::kChannel,
           py::arg("group_size") = 0, py::arg("block_rows") = 0, py::arg("block_cols") = 0,
           py::arg("scale") = ScaleKind::kFloat, py::arg("scale_dtype") = ScaleDtype::kFloat32,
           py::arg("global_scale") = false,
           "A weight format (moequant/format.h); bits=0 takes the element's width (int needs 2..8)")
      .def_static("int_", [checked](int bits, bool symmetric, int64_t group_size, ScaleDtype scale_dtype) {
             return checked(moequant::format_int(bits, symmetric, group_size, scale_dtype));
           }, py::arg("bits"), py::arg("symmetric"), py::arg("group_size"), py::arg("scale_dtype") = ScaleDtype::kFloat32)
      .def_static("fp8_channel", [checked](ScaleDtype d) { return checked(moequant::format_fp8_channel(d)); },
                  py::arg("scale_dtype") = ScaleDtype::kFloat32)
      .def_static("fp8_tensor", [checked](ScaleDtype d) { return checked(moequant::format_fp8_tensor(d)); },
                  py::arg("scale_dtype") = ScaleDtype::kFloat32)
      .def_static("fp8_block", [checked](int64_t r, int64_t c, ScaleDtype d) {
             return checked(moequant::format_fp8_block(r, c, d));
           }, py::arg("block_rows") = 128, py::arg("block_cols") = 128, py::arg("scale_dtype") = ScaleDtype::kFloat32)
      .def_static("nvfp4", [checked]() { return checked(moequant::format_nvfp4()); })
      .def_static("mxfp4", [checked]() { return checked(moequant::format_mxfp4()); })
      .def_static("mx", [checked](ElementKind e) { return checked(moequant::format_mx(e)); }, py::arg("element"))
      .def_readonly("element", &Format::element)
      .def_readonly("bits", &Format::bits)
      .def_readonly("symmetric", &Format::symmetric)
      .def_readonly("group", &Format::group)
      .def_readonly("group_size", &Format::group_size)
      .def_readonly("block_rows", &Format::block_rows)
      .def_readonly("block_cols", &Format::block_cols)
      .def_readonly("scale", &Format::scale)
      .def_readonly("scale_dtype", &Format::scale_dtype)
      .def_readonly("global_scale", &Format::global_scale)
      .def("__repr__", [](const Format& f) {
        return fmt::format("Format(element={}, bits={}, symmetric={}, group={}, group_size={}, block=[{}, {}], "
                           "scale={}, scale_dtype={}, global_scale={})",
                           moequant::element_kind_name(f.element), f.bits, f.symmetric,
                           moequant::group_kind_name(f.group), f.group_size, f.block_rows, f.block_cols,
                           moequant::scale_kind_name(f.scale), static_cast<int>(f.scale_dtype), f.global_scale);
      });
  m.def("format_scale_shape", &format_scale_shape, py::arg("format"), py::arg("rows"), py::arg("cols"),
        "(scale_rows, scale_cols) of a [rows, cols] weight in this format");
  m.def("encode_elements", &encode_elements, py::arg("x"), py::arg("element"),
        "the element codec of format.h (CPU): float32 values -> uint8 codes (round to nearest even, saturating)");
  m.def("decode_elements", &decode_elements, py::arg("codes"), py::arg("element"),
        "the element codec of format.h (CPU): uint8 codes -> float32 values");
  m.def("format_quantize", &format_quantize, py::arg("w"), py::arg("format"), py::arg("global_scale") = py::none(),
        py::arg("dequantized") = true,
        "RTN quantization of w [rows, cols] (float32 / bfloat16 / float16, unit-stride rows) -> (codes uint8 [rows, "
        "cols], scales f32 [sr, sc] (values), scale_codes uint8 [sr, sc] (FP8 / E8M0 bytes, 0 for float scales), "
        "zeros int32 [sr, sc] (asymmetric int, else 0), global_scale f32 [1] (1 without one), dequantized f32 [rows, "
        "cols] ([0, 0] when dequantized=False)); global_scale: a caller's f32 tensor of one element (NVFP4 fused "
        "partners), else computed from w's absmax");
  m.def("gptq_format", &gptq_format, py::arg("w"), py::arg("h"), py::arg("format"), py::arg("global_scale") = py::none(),
        py::arg("act_order") = false, py::arg("damp") = 0.01, py::arg("block_size") = 128,
        "GPTQ of w float32 [rows, cols] in any format on the Hessian h [cols, cols] (float32 / float64), CPU -> "
        "(codes uint8, scales f32, scale_codes uint8, zeros int32, global_scale f32 [1], dequantized f32, info dict) "
        "laid out as format_quantize's; global_scale: a caller's f32 tensor of one element (NVFP4 partners)");
  m.def("gptq_factor", &gptq_factor, py::arg("h"), py::arg("act_order") = false, py::arg("damp") = 0.01,
        "the CPU GPTQ solvers' inverse factor of h [n, n]: (U f32 [n, n] row-major in processing order, perm int64 "
        "[n], info dict); tests feed it to moequant.ref.gptq_quantize_format_ref");
  m.def("gptq_format_batched", &gptq_format_batched, py::arg("w"), py::arg("h"), py::arg("format"),
        py::arg("global_scale") = py::none(), py::arg("act_order") = false, py::arg("damp") = 0.01,
        py::arg("block_size") = 128, py::arg("compute_loss") = true, py::arg("overwrite_h") = false,
        py::arg("max_shared_memory_bytes") = 0,
        "batched GPTQ of E experts in any format on CUDA: w [E, out, in], h [E, in, in] float32, global_scale None "
        "or f32 [E] -> (codes uint8 [E, out, in], scales f32 [E, sr, sc], scale_codes uint8, zeros int32, global "
        "scales f32 [E], dequantized f32 [E, out, in], losses f64 [E], escalations int32 [E])");
  m.def("format_dequantize", &format_dequantize, py::arg("codes"), py::arg("scales"), py::arg("zeros") = py::none(),
        py::arg("global_scale") = py::none(), py::arg("format"), py::arg("out_dtype") = ScaleDtype::kFloat32,
        "codes uint8 [rows, cols] + scale values f32 [sr, sc] (+ zeros int32, + global scale f32 [1]) -> float32 or "
        "bfloat16 [rows, cols]");
  m.def("pack_fp_codes", &pack_fp_codes, py::arg("codes"), py::arg("element"),
        "FP4: two codes per byte, low nibble first; FP6: four codes per three bytes (little-endian 24-bit word); "
        "FP8: the bytes -> uint8 [rows, packed_row_bytes]");
  m.def("unpack_fp_codes", &unpack_fp_codes, py::arg("packed"), py::arg("element"), py::arg("cols"),
        "inverse of pack_fp_codes -> uint8 codes [rows, cols]");
  m.def("decode_fp8_block_scaled", &decode_fp8_block_scaled, py::arg("weight"), py::arg("weight_scale_inv"),
        py::arg("block_rows") = 128, py::arg("block_cols") = 128, py::arg("out_dtype") = ScaleDtype::kBFloat16,
        "DeepSeek-V3 / Kimi-K2 FP8: weight float8_e4m3fn [r, c] * weight_scale_inv f32 [ceil(r/128), ceil(c/128)] "
        "per block -> bfloat16 / float32 [r, c]");
  m.def("decode_mxfp4_blocks", &decode_mxfp4_blocks, py::arg("blocks"), py::arg("scales"),
        py::arg("out_dtype") = ScaleDtype::kBFloat16,
        "gpt-oss MXFP4: blocks uint8 [..., G, 16] + E8M0 scales uint8 [..., G] -> bfloat16 / float32 [..., G * 32] "
        "(transformers' convert_moe_packed_tensors before its transpose)");
}
