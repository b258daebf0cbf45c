// bindings/ops_cpu.cpp -- CPU implementations: tensors to pointers, then the header-first core.
#include "checks.h"
#include "ops.h"

#include <moequant/format.h>
#include <moequant/gptq.h>
#include <moequant/gptq_format.h>
#include <moequant/hadamard.h>
#include <moequant/hessian.h>
#include <moequant/pack.h>
#include <moequant/quant.h>
#include <moequant/rounding.h>

#include <pybind11/pybind11.h>

namespace moequant {
namespace bindings {
namespace {

MatrixView view_of(const at::Tensor& w) {
  return MatrixView{w.data_ptr<float>(), w.size(0), w.size(1), w.stride(0)};
}

QuantTensors alloc_quant(const at::Tensor& w, const QuantSpec& spec) {
  const int64_t rows = w.size(0), cols = w.size(1), groups = num_groups(spec, cols);
  auto opts = w.options();
  return {at::empty({rows, cols}, opts.dtype(at::kChar)), at::empty({rows, groups}, opts.dtype(at::kFloat)),
          at::empty({rows, groups}, opts.dtype(at::kInt)), at::empty({rows, cols}, opts.dtype(at::kFloat))};
}

QuantizedOut out_of(QuantTensors& t) {
  return QuantizedOut{std::get<0>(t).data_ptr<int8_t>(), std::get<1>(t).data_ptr<float>(),
                      std::get<2>(t).data_ptr<int32_t>(), std::get<3>(t).data_ptr<float>()};
}

}  // namespace

QuantTensors quantize_rtn_cpu(const at::Tensor& w, const QuantSpec& spec) {
  throw_if_error(validate(spec, w.size(1)));
  QuantTensors out = alloc_quant(w, spec);
  Status s;
  {
    pybind11::gil_scoped_release no_gil;
    s = quantize_rtn(view_of(w), spec, out_of(out));
  }
  throw_if_error(s);
  return out;
}

at::Tensor dequantize_cpu(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor* zeros,
                          const QuantSpec& spec) {
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  throw_if_error(dequantize(codes.data_ptr<int8_t>(), scales.data_ptr<float>(),
                            zeros ? zeros->data_ptr<int32_t>() : nullptr, codes.size(0), codes.size(1), spec,
                            out.data_ptr<float>()));
  return out;
}

at::Tensor pack_rows_cpu(const at::Tensor& q, int bits) {
  at::Tensor out = at::empty({q.size(0), packed_words(q.size(1), bits)}, q.options().dtype(at::kInt));
  throw_if_error(pack_rows(q.data_ptr<int8_t>(), q.size(0), q.size(1), bits, out.data_ptr<int32_t>()));
  return out;
}

at::Tensor unpack_rows_cpu(const at::Tensor& packed, int bits, int64_t cols) {
  at::Tensor out = at::empty({packed.size(0), cols}, packed.options().dtype(at::kChar));
  throw_if_error(unpack_rows(packed.data_ptr<int32_t>(), packed.size(0), cols, bits, out.data_ptr<int8_t>()));
  return out;
}

void accumulate_hessian_cpu(at::Tensor& H, at::Tensor& counts, at::Tensor& mass, const at::Tensor& x,
                            const at::Tensor& ids, const at::Tensor* weights) {
  const float* wp = weights ? weights->data_ptr<float>() : nullptr;
  Status s;
  {
    pybind11::gil_scoped_release no_gil;
    if (H.scalar_type() == at::kDouble) {
      s = accumulate_hessian<double>(x.data_ptr<float>(), x.size(0), x.size(1), x.stride(0), ids.data_ptr<int32_t>(),
                                     wp, H.size(0), H.data_ptr<double>(), counts.data_ptr<int64_t>(),
                                     mass.data_ptr<double>());
    } else {
      s = accumulate_hessian<float>(x.data_ptr<float>(), x.size(0), x.size(1), x.stride(0), ids.data_ptr<int32_t>(),
                                    wp, H.size(0), H.data_ptr<float>(), counts.data_ptr<int64_t>(),
                                    mass.data_ptr<double>());
    }
  }
  throw_if_error(s);
}

std::tuple<QuantTensors, GptqInfo> gptq_cpu(const at::Tensor& w, const at::Tensor& h, const QuantSpec& spec,
                                            const GptqOptions& opt) {
  throw_if_error(validate(spec, w.size(1)));
  QuantTensors out = alloc_quant(w, spec);
  GptqArgs args;
  args.spec = spec;
  args.act_order = opt.act_order;
  args.damp = opt.damp;
  args.block_size = opt.block_size;
  GptqReport report;
  Status s;
  {
    pybind11::gil_scoped_release no_gil;
    if (h.scalar_type() == at::kDouble)
      s = gptq_solve<double>(view_of(w), h.data_ptr<double>(), h.stride(0), args, out_of(out), &report);
    else
      s = gptq_solve<float>(view_of(w), h.data_ptr<float>(), h.stride(0), args, out_of(out), &report);
  }
  throw_if_error(s);
  GptqInfo info{report.loss, report.damp_fraction, report.damp_value, report.escalations, report.dead_columns};
  return {out, info};
}

std::tuple<FormatTensors, GptqInfo> gptq_format_cpu(const at::Tensor& w, const at::Tensor& h, const Format& f,
                                                    const at::Tensor* global_scale, const GptqOptions& opt) {
  const int64_t rows = w.size(0), cols = w.size(1);
  throw_if_error(validate(f, rows, cols));
  const int64_t sr = scale_rows(f, rows), sc = scale_cols(f, cols);
  auto opts = w.options();
  at::Tensor codes = at::empty({rows, cols}, opts.dtype(at::kByte));
  at::Tensor scales = at::empty({sr, sc}, opts.dtype(at::kFloat));
  at::Tensor scale_codes = at::zeros({sr, sc}, opts.dtype(at::kByte));
  at::Tensor zeros = at::zeros({sr, sc}, opts.dtype(at::kInt));
  at::Tensor g = at::ones({1}, opts.dtype(at::kFloat));
  at::Tensor deq = at::empty({rows, cols}, opts.dtype(at::kFloat));
  FormatQuantized out;
  out.codes = codes.data_ptr<uint8_t>();
  out.scales = scales.data_ptr<float>();
  out.scale_codes = scale_codes.data_ptr<uint8_t>();
  out.zeros = zeros.data_ptr<int32_t>();
  out.global_scale = g.data_ptr<float>();
  out.dequantized = deq.data_ptr<float>();
  GptqFormatArgs args;
  args.format = f;
  args.act_order = opt.act_order;
  args.damp = opt.damp;
  args.block_size = opt.block_size;
  const float* gin = global_scale ? global_scale->data_ptr<float>() : nullptr;
  GptqReport report;
  Status s;
  {
    pybind11::gil_scoped_release no_gil;
    if (h.scalar_type() == at::kDouble)
      s = gptq_solve_format<double>(view_of(w), h.data_ptr<double>(), h.stride(0), args, gin, out, &report);
    else
      s = gptq_solve_format<float>(view_of(w), h.data_ptr<float>(), h.stride(0), args, gin, out, &report);
  }
  throw_if_error(s);
  GptqInfo info{report.loss, report.damp_fraction, report.damp_value, report.escalations, report.dead_columns};
  return {FormatTensors{codes, scales, scale_codes, zeros, g, deq}, info};
}

std::tuple<at::Tensor, at::Tensor, GptqInfo> gptq_factor_cpu(const at::Tensor& h, bool act_order, double damp) {
  const int64_t n = h.size(0);
  GptqArgs args;
  args.spec.group_size = -1;
  args.act_order = act_order;
  args.damp = damp;
  const std::vector<float> zero_row(static_cast<size_t>(n), 0.0f);  // validate_gptq checks a weight too
  const MatrixView w{zero_row.data(), 1, n, n};
  at::Tensor U = at::empty({n, n}, h.options().dtype(at::kFloat));
  at::Tensor perm = at::empty({n}, h.options().dtype(at::kLong));
  GptqReport report;
  Status s;
  {
    pybind11::gil_scoped_release no_gil;
    detail::GptqFactor fac;
    if (h.scalar_type() == at::kDouble) {
      s = detail::validate_gptq(w, h.data_ptr<double>(), h.stride(0), args);
      if (s.ok()) s = detail::gptq_factor(h.data_ptr<double>(), h.stride(0), n, act_order, args, &fac, &report);
    } else {
      s = detail::validate_gptq(w, h.data_ptr<float>(), h.stride(0), args);
      if (s.ok()) s = detail::gptq_factor(h.data_ptr<float>(), h.stride(0), n, act_order, args, &fac, &report);
    }
    if (s.ok()) {
      float* u = U.data_ptr<float>();
      int64_t* p = perm.data_ptr<int64_t>();
      for (int64_t i = 0; i < n; ++i) {
        p[i] = fac.perm[i];
        for (int64_t j = 0; j < n; ++j) u[i * n + j] = fac.U(i, j);
      }
    }
  }
  throw_if_error(s);
  return {U, perm, GptqInfo{0.0, report.damp_fraction, report.damp_value, report.escalations, report.dead_columns}};
}

at::Tensor hadamard_cpu(const at::Tensor& x) {
  const int64_t n = x.size(-1), rows = n > 0 ? x.numel() / n : 0;
  const at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  Status s;
  {
    pybind11::gil_scoped_release no_gil;
    s = hadamard_transform(xf.data_ptr<float>(), out.data_ptr<float>(), rows, n);
  }
  throw_if_error(s);
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, RoundingInfo> greedy_rounding_cpu(const at::Tensor& w, const at::Tensor& h,
                                                                    const at::Tensor& codes, const at::Tensor& scales,
                                                                    const at::Tensor* zeros, const QuantSpec& spec,
                                                                    int passes, double outlier_quantile) {
  at::Tensor q = codes.clone();
  at::Tensor deq = at::empty(w.sizes(), w.options().dtype(at::kFloat));
  RoundingArgs args;
  args.passes = passes;
  args.outlier_quantile = outlier_quantile;
  RoundingReport rep;
  const int32_t* zp = zeros ? zeros->data_ptr<int32_t>() : nullptr;
  Status s;
  {
    pybind11::gil_scoped_release no_gil;
    if (h.scalar_type() == at::kDouble)
      s = greedy_rounding<double>(view_of(w), h.data_ptr<double>(), h.stride(0), spec, scales.data_ptr<float>(), zp,
                                  q.data_ptr<int8_t>(), deq.data_ptr<float>(), args, &rep);
    else
      s = greedy_rounding<float>(view_of(w), h.data_ptr<float>(), h.stride(0), spec, scales.data_ptr<float>(), zp,
                                 q.data_ptr<int8_t>(), deq.data_ptr<float>(), args, &rep);
  }
  throw_if_error(s);
  return {q, deq, RoundingInfo{rep.loss_before, rep.loss_after, rep.flips, rep.excluded, rep.rows_reverted}};
}

// ---- formats (moequant/format.h) -------------------------------------------------------------------------------

namespace {
ScaleDtype dtype_code(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 ? ScaleDtype::kBFloat16
                                          : (t.scalar_type() == at::kHalf ? ScaleDtype::kFloat16 : ScaleDtype::kFloat32);
}
at::ScalarType out_scalar_type(ScaleDtype d) { return d == ScaleDtype::kBFloat16 ? at::kBFloat16 : at::kFloat; }
}  // namespace

FormatTensors format_quantize_cpu(const at::Tensor& w, const Format& f, const at::Tensor* global_scale,
                                  bool dequantized) {
  const int64_t rows = w.size(0), cols = w.size(1);
  throw_if_error(validate(f, rows, cols));
  const int64_t sr = scale_rows(f, rows), sc = scale_cols(f, cols);
  auto opts = w.options();
  at::Tensor codes = at::empty({rows, cols}, opts.dtype(at::kByte));
  at::Tensor scales = at::empty({sr, sc}, opts.dtype(at::kFloat));
  at::Tensor scale_codes = at::zeros({sr, sc}, opts.dtype(at::kByte));
  at::Tensor zeros = at::zeros({sr, sc}, opts.dtype(at::kInt));
  at::Tensor g = at::ones({1}, opts.dtype(at::kFloat));
  at::Tensor deq = at::empty({dequantized ? rows : 0, dequantized ? cols : 0}, opts.dtype(at::kFloat));
  FormatQuantized out;
  out.codes = codes.data_ptr<uint8_t>();
  out.scales = scales.data_ptr<float>();
  out.scale_codes = f.scale == ScaleKind::kFloat ? nullptr : scale_codes.data_ptr<uint8_t>();
  out.zeros = f.element == ElementKind::kInt && !f.symmetric ? zeros.data_ptr<int32_t>() : nullptr;
  out.global_scale = g.data_ptr<float>();
  out.dequantized = dequantized ? deq.data_ptr<float>() : nullptr;
  const FloatMatrix m{w.data_ptr(), dtype_code(w), rows, cols, w.stride(0)};
  const float* gin = global_scale ? global_scale->data_ptr<float>() : nullptr;
  Status s;
  {
    pybind11::gil_scoped_release no_gil;
    s = format_quantize(m, f, gin, out);
  }
  throw_if_error(s);
  return {codes, scales, scale_codes, zeros, g, deq};
}

at::Tensor format_dequantize_cpu(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor* zeros,
                                 const at::Tensor* global_scale, const Format& f, ScaleDtype out_dtype) {
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(out_scalar_type(out_dtype)));
  Status s;
  {
    pybind11::gil_scoped_release no_gil;
    s = format_dequantize(codes.data_ptr<uint8_t>(), codes.size(0), codes.size(1), scales.data_ptr<float>(),
                          zeros ? zeros->data_ptr<int32_t>() : nullptr,
                          global_scale ? global_scale->data_ptr<float>() : nullptr, f, out.data_ptr(), out_dtype);
  }
  throw_if_error(s);
  return out;
}

at::Tensor pack_fp_codes_cpu(const at::Tensor& codes, ElementKind k) {
  at::Tensor out =
      at::empty({codes.size(0), packed_row_bytes(k, codes.size(1))}, codes.options().dtype(at::kByte));
  throw_if_error(pack_codes(codes.data_ptr<uint8_t>(), codes.size(0), codes.size(1), k, out.data_ptr<uint8_t>()));
  return out;
}

at::Tensor unpack_fp_codes_cpu(const at::Tensor& packed, ElementKind k, int64_t cols) {
  at::Tensor out = at::empty({packed.size(0), cols}, packed.options().dtype(at::kByte));
  throw_if_error(unpack_codes(packed.data_ptr<uint8_t>(), packed.size(0), cols, k, out.data_ptr<uint8_t>()));
  return out;
}

at::Tensor decode_fp8_block_scaled_cpu(const at::Tensor& weight, const at::Tensor& scale_inv, int64_t block_rows,
                                       int64_t block_cols, ScaleDtype out_dtype) {
  at::Tensor out = at::empty(weight.sizes(), weight.options().dtype(out_scalar_type(out_dtype)));
  Status s;
  {
    pybind11::gil_scoped_release no_gil;
    s = decode_fp8_block_scaled(weight.data_ptr<uint8_t>(), weight.size(0), weight.size(1),
                                scale_inv.data_ptr<float>(), block_rows, block_cols, out.data_ptr(), out_dtype);
  }
  throw_if_error(s);
  return out;
}

at::Tensor decode_mxfp4_blocks_cpu(const at::Tensor& blocks, const at::Tensor& scales, ScaleDtype out_dtype) {
  const int64_t rows = blocks.size(0), groups = blocks.size(1);
  at::Tensor out = at::empty({rows, groups * 32}, blocks.options().dtype(out_scalar_type(out_dtype)));
  Status s;
  {
    pybind11::gil_scoped_release no_gil;
    s = decode_mxfp4_blocks(blocks.data_ptr<uint8_t>(), scales.data_ptr<uint8_t>(), rows, groups, out.data_ptr(),
                            out_dtype);
  }
  throw_if_error(s);
  return out;
}

at::Tensor encode_elements_cpu(const at::Tensor& x, ElementKind k) {
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kByte));
  const float* src = x.data_ptr<float>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  const int e = static_cast<int>(k);
  for (int64_t i = 0; i < x.numel(); ++i) dst[i] = encode_element(e, src[i]);
  return out;
}

at::Tensor decode_elements_cpu(const at::Tensor& codes, ElementKind k) {
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  const uint8_t* src = codes.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  const int e = static_cast<int>(k);
  for (int64_t i = 0; i < codes.numel(); ++i) dst[i] = decode_element(e, src[i]);
  return out;
}

}  // namespace bindings
}  // namespace moequant
