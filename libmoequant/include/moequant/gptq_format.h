// moequant/gptq_format.h -- GPTQ for every weight format of format.h (FP8 per tensor / channel / 128x128 block, NVFP4,
// MXFP4 / MXFP6 / MXFP8, FP6, ints), a pure function like gptq_solve.
//
// What changes from the integer solver of gptq.h is only the "quantize to the grid" step of the column loop: column c
// of W is rounded to the format's element grid with the scale of the group (tile) each of its elements belongs to,
// exactly as format_quantize rounds it (format.h: quantize_element / dequantize_element). The error feedback, the
// inverse factor U, dead columns, act-order and damping are gptq.h's (detail::gptq_factor is shared).
//
// Scales are static: every tile's parameters (float / FP8 / E8M0 scale, int zero point) and, for NVFP4, the
// per-tensor global scale are derived up front from the ORIGINAL weight with its dead columns zeroed, by format.h's
// derive_group_params -- exactly what format_quantize returns for that matrix. The global scale is computed first
// (448 * 6 / amax of the whole matrix) unless the caller passes one: solving gate and up as one [2I, H] matrix shares
// it naturally; partners solved separately pass the same value (`global_scale_in`). GPTQ then only chooses the element
// codes. This is the int path's act-order rule ("static groups") applied with and without act-order. Why not the int
// path's dynamic groups (parameters from the error-updated columns at a group's first column) without act-order:
//   * the exported scales are RTN's (format_quantize of the same weight), whatever the Hessian;
//   * per-tensor and per-channel scales are the same either way (their first column sees the original matrix), and a
//     128 x 128 block or an NVFP4 group scale would otherwise depend on the processing of 128 rows or on a global
//     scale fixed before the updates;
//   * llm-compressor's GPTQ (0.8+) derives every strategy's qparams from the original weight before the column loop.
//
// Arithmetic. Every update of the working copy is `w = w - e_j * U(j, c)` in fp32 (the product rounded, then the
// difference; the core is compiled with -ffp-contract=off), applied in increasing j. The lazy blocks of block_size
// columns only reorganise the loops (the trailing update walks j in order too, instead of a GEMM), so the result does
// not depend on block_size and equals the column-by-column reference (ref/gptq_format_ref.h, moequant.ref.gptq) bit
// for bit when both use the same U. (gptq_solve keeps its Eigen GEMM for the trailing update: the int path stays
// bit-identical to earlier releases.)
//
// Int formats that quant.h can express (per channel, or groups dividing in_features) are solved by gptq_solve itself
// (min/max scales, dynamic groups without act-order): gptq_solve_format == gptq_solve bit for bit on them. Other int
// layouts (per tensor, blocks, ragged groups) take the static-scale engine above with format.h's int rounding.
#pragma once

#include <moequant/format.h>
#include <moequant/gptq.h>
#include <moequant/quant.h>
#include <moequant/status.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <new>
#include <vector>

namespace moequant {
inline namespace v0 {

struct GptqFormatArgs {
  Format format = format_nvfp4();
  bool act_order = false;
  double damp = 0.01;                    // fraction of mean(diag H) added to the diagonal
  int64_t block_size = 128;              // columns per lazy batch, any value >= 1 (the result does not depend on it)
  int max_damp_escalations = 8;          // retries with a larger damp when H is not positive definite
  double damp_escalation_factor = 10.0;  // damp fraction multiplier per retry (> 1)

  /// The solver settings as gptq.h's GptqArgs (its spec: per-channel 4-bit, valid for any in_features >= 1).
  GptqArgs gptq_args() const {
    GptqArgs a;
    a.spec.group_size = -1;
    a.act_order = act_order;
    a.damp = damp;
    a.block_size = block_size;
    a.max_damp_escalations = max_damp_escalations;
    a.damp_escalation_factor = damp_escalation_factor;
    return a;
  }
};

/// True when gptq_solve_format hands `f` to gptq_solve: an int format per channel, or with groups dividing cols.
inline bool gptq_format_uses_int_solver(const Format& f, int64_t cols) noexcept {
  if (f.element != ElementKind::kInt) return false;
  if (f.group == GroupKind::kChannel) return true;
  return f.group == GroupKind::kGroup && f.group_size > 0 && cols > 0 && cols % f.group_size == 0;
}

/// The QuantSpec of such an int format (min/max scales).
inline QuantSpec gptq_format_int_spec(const Format& f) noexcept {
  QuantSpec s;
  s.bits = f.bits;
  s.symmetric = f.symmetric;
  s.group_size = f.group == GroupKind::kGroup ? f.group_size : -1;
  s.scale_dtype = f.scale_dtype;
  s.search = ScaleSearch::kMinMax;
  return s;
}

namespace detail {

/// Checks every argument of gptq_solve_format (shared with its reference twin so both fail alike): the format
/// (format.h's messages), then gptq.h's checks of w, h and the solver settings, then the caller's global scale.
template <typename HT>
Status validate_gptq_format(const MatrixView& w, const HT* h, int64_t ldh, const GptqFormatArgs& a,
                            const float* global_scale_in) {
  MQ_RETURN_IF_ERROR(validate(a.format));
  if (global_scale_in != nullptr) {
    if (!a.format.global_scale)
      return Status::invalid("global_scale: expected none for a format without a global scale ({} elements, {} scales), "
                             "got {}",
                             element_kind_name(a.format.element), scale_kind_name(a.format.scale), *global_scale_in);
    MQ_RETURN_IF_ERROR(fmt_detail::check_global_scale(*global_scale_in));
  }
  return validate_gptq(w, h, ldh, a.gptq_args());
}

/// W(:, c) -= E(:, m) * U(m, c) for c in [c0, c1), m in [0, nm): W, E column-major (leading dimensions ldw, lde), U(m, c)
/// at u[c * ldu + m]. Per element the terms are applied one by one in increasing m, each product rounded to float
/// before the subtraction -- exactly the column-by-column updates, so blocking changes no bit. Register tiles of 64 rows
/// x 4 columns (the error column of a step is read once for 4 columns); about 80 % of Eigen's SGEMM on one core.
inline void ordered_update(float* W, int64_t ldw, const float* E, int64_t lde, const float* u, int64_t ldu,
                           int64_t nm, int64_t c0, int64_t c1, int64_t rows) {
  constexpr int64_t kRows = 64, kCols = 4;
  for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
    const int64_t nr = std::min(kRows, rows - r0);
    int64_t c = c0;
    if (nr == kRows) {
      for (; c + kCols <= c1; c += kCols) {
        float acc[kCols][kRows];
        for (int64_t k = 0; k < kCols; ++k)
          for (int64_t r = 0; r < kRows; ++r) acc[k][r] = W[(c + k) * ldw + r0 + r];
        for (int64_t m = 0; m < nm; ++m) {
          const float* em = E + m * lde + r0;
          for (int64_t k = 0; k < kCols; ++k) {
            const float um = u[(c + k) * ldu + m];
            for (int64_t r = 0; r < kRows; ++r) acc[k][r] = acc[k][r] - em[r] * um;
          }
        }
        for (int64_t k = 0; k < kCols; ++k)
          for (int64_t r = 0; r < kRows; ++r) W[(c + k) * ldw + r0 + r] = acc[k][r];
      }
    }
    for (; c < c1; ++c) {  // the edges: a partial row tile, the last columns
      float* wc = W + c * ldw + r0;
      const float* uc = u + c * ldu;
      for (int64_t m = 0; m < nm; ++m) {
        const float um = uc[m];
        const float* em = E + m * lde + r0;
        for (int64_t r = 0; r < nr; ++r) wc[r] = wc[r] - em[r] * um;
      }
    }
  }
}

/// An int format of quant.h: gptq_solve, its outputs converted to format_quantize's (uint8 two's-complement codes).
template <typename HT>
Status gptq_format_via_int(const MatrixView& w, const HT* h, int64_t ldh, const GptqFormatArgs& args,
                           const FormatQuantized& out, GptqReport* report) {
  GptqArgs ga = args.gptq_args();
  ga.spec = gptq_format_int_spec(args.format);
  const int64_t rows = w.rows, cols = w.cols;
  std::vector<int8_t> codes;
  try {
    if (out.codes) codes.resize(static_cast<size_t>(rows * cols));
  } catch (const std::bad_alloc&) {
    return Status::invalid("w: could not allocate the GPTQ working memory for a [{}, {}] weight", rows, cols);
  }
  const QuantizedOut qo{out.codes ? codes.data() : nullptr, out.scales, out.zeros, out.dequantized};
  MQ_RETURN_IF_ERROR(gptq_solve(w, h, ldh, ga, qo, report));
  if (out.codes)
    for (size_t i = 0; i < codes.size(); ++i) out.codes[i] = static_cast<uint8_t>(codes[i]);
  if (out.scale_codes) {
    const int64_t n = scale_rows(args.format, rows) * scale_cols(args.format, cols);
    for (int64_t i = 0; i < n; ++i) out.scale_codes[i] = 0;
  }
  return {};
}

/// The tile parameters of a [rows, cols] matrix (row-major, ld) in format f, [scale_rows, scale_cols] (format_quantize's
/// derivation: each tile's range with 0 included, the global scale first); *g receives the global scale (1 without
/// one). A non-finite effective scale (an fp16 scale that overflowed) is an error naming scale_dtype.
inline Status static_tile_params(const float* x, int64_t ld, int64_t rows, int64_t cols, const Format& f,
                                 const float* global_scale_in, std::vector<GroupParams>* params, float* g) {
  const FormatCore core = f.core();
  *g = 1.0f;
  if (f.global_scale) {
    if (global_scale_in) {
      *g = *global_scale_in;
    } else {
      float lo = 0.0f, hi = 0.0f;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) {
          lo = fmt_detail::std_min(lo, x[r * ld + c]);
          hi = fmt_detail::std_max(hi, x[r * ld + c]);
        }
      *g = global_scale_from_amax(core, fmt_detail::std_max(fmt_detail::mq_fsub(0.0f, lo), hi));
    }
  }
  const int64_t tr = tile_rows(f, rows), tc = tile_cols(f, cols);
  const int64_t sr = scale_rows(f, rows), sc = scale_cols(f, cols);
  params->assign(static_cast<size_t>(sr * sc), GroupParams{});
  for (int64_t br = 0; br < sr; ++br)
    for (int64_t bc = 0; bc < sc; ++bc) {
      const int64_t r0 = br * tr, r1 = std::min(rows, r0 + tr), c0 = bc * tc, c1 = std::min(cols, c0 + tc);
      float lo = 0.0f, hi = 0.0f;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) {
          lo = fmt_detail::std_min(lo, x[r * ld + c]);
          hi = fmt_detail::std_max(hi, x[r * ld + c]);
        }
      const GroupParams p = derive_group_params(core, lo, hi, *g);
      if (!std::isfinite(p.effective))
        return Status::invalid("scale_dtype: float16 cannot hold the scale of tile ({}, {}) (rows [{}, {}), columns "
                               "[{}, {})); use bfloat16 or float32 scales",
                               br, bc, r0, r1, c0, c1);
      (*params)[br * sc + bc] = p;
    }
  return {};
}

}  // namespace detail

/// GPTQ of one weight w [rows, cols] in format args.format against the Hessian h [cols, cols] (HT = float or double;
/// only its lower triangle is read, as gptq_solve). See the top of this file. global_scale_in: the caller's global
/// scale (formats with one only, e.g. NVFP4 partners solved separately; finite, > 0), or null to compute it.
/// Outputs, as format_quantize's (any pointer may be null): codes [rows, cols] (element bits; int: the two's-complement
/// byte), scales / scale_codes / zeros [scale_rows, scale_cols], global_scale [1] (formats with one), dequantized
/// [rows, cols]. report may be null (then the proxy loss tr((W - Q) H (W - Q)^T) is not computed).
template <typename HT>
Status gptq_solve_format(const MatrixView& w, const HT* h, int64_t ldh, const GptqFormatArgs& args,
                         const float* global_scale_in, const FormatQuantized& out, GptqReport* report) {
  detail::static_check_ht<HT>();
  MQ_RETURN_IF_ERROR(detail::validate_gptq_format(w, h, ldh, args, global_scale_in));
  const Format& f = args.format;
  const int64_t rows = w.rows, cols = w.cols;
  if (gptq_format_uses_int_solver(f, cols)) return detail::gptq_format_via_int(w, h, ldh, args, out, report);
  const FormatCore core = f.core();
  GptqReport rep;
  try {
    // ---- dead columns, processing order, inverse factor ----
    detail::GptqFactor fac;
    const Status fs = detail::gptq_factor(h, ldh, cols, args.act_order, args.gptq_args(), &fac, &rep);
    if (report) *report = rep;
    MQ_RETURN_IF_ERROR(fs);
    const std::vector<char>& dead = fac.dead;
    const std::vector<int64_t>& perm = fac.perm;
    const detail::MatXf& U = fac.U;

    // ---- static tile parameters of the dead-zeroed original (global scale first) ----
    std::vector<float> w0(static_cast<size_t>(rows * cols));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) w0[r * cols + c] = dead[c] ? 0.0f : w.at(r, c);
    std::vector<GroupParams> params;
    float g = 1.0f;
    MQ_RETURN_IF_ERROR(detail::static_tile_params(w0.data(), cols, rows, cols, f, global_scale_in, &params, &g));
    w0.clear();
    w0.shrink_to_fit();
    const int64_t tr = tile_rows(f, rows), tc = tile_cols(f, cols), sc = scale_cols(f, cols);
    std::vector<int64_t> row_base(static_cast<size_t>(rows));  // index of row r's first tile
    for (int64_t r = 0; r < rows; ++r) row_base[r] = (r / tr) * sc;

    // ---- the column loop (W column-major in processing order, float) ----
    detail::MatXf W(rows, cols);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < cols; ++j) W(r, j) = dead[perm[j]] ? 0.0f : w.at(r, perm[j]);
    std::vector<uint8_t> codes(static_cast<size_t>(rows * cols));  // column-major, processing order
    const int64_t B = std::min(args.block_size, cols);
    detail::MatXf err(rows, B);
    const float* u = U.data();  // U(m, c) at u[c * cols + m]
    for (int64_t i1 = 0; i1 < cols; i1 += B) {
      const int64_t i2 = std::min(i1 + B, cols);
      for (int64_t j = i1; j < i2; ++j) {
        const int64_t tcol = perm[j] / tc;
        const float d = U(j, j);
        float* wc = &W(0, j);
        float* ec = &err(0, j - i1);
        uint8_t* cc = codes.data() + j * rows;
        for (int64_t r = 0; r < rows; ++r) {
          const GroupParams& p = params[row_base[r] + tcol];
          const uint8_t q = quantize_element(core, wc[r], p);
          cc[r] = q;
          ec[r] = (wc[r] - dequantize_element(core, q, p.effective, p.zero)) / d;
        }
        for (int64_t c = j + 1; c < i2; ++c) {  // in-block update, one column at a time
          const float ujc = u[c * cols + j];
          float* w2 = &W(0, c);
          for (int64_t r = 0; r < rows; ++r) w2[r] = w2[r] - ec[r] * ujc;
        }
      }
      if (i2 < cols) detail::ordered_update(W.data(), rows, err.data(), rows, u + i1, cols, i2 - i1, i2, cols, rows);
    }
    W.resize(0, 0);
    fac.U.resize(0, 0);

    // ---- outputs in the original column order ----
    std::vector<float> dq_tmp;
    float* dq = out.dequantized;
    if (dq == nullptr && report != nullptr) {
      dq_tmp.resize(static_cast<size_t>(rows * cols));
      dq = dq_tmp.data();
    }
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t c = perm[j], tcol = c / tc;
      for (int64_t r = 0; r < rows; ++r) {
        const uint8_t q = codes[j * rows + r];
        if (out.codes) out.codes[r * cols + c] = q;
        if (dq) {
          const GroupParams& p = params[row_base[r] + tcol];
          dq[r * cols + c] = dequantize_element(core, q, p.effective, p.zero);
        }
      }
    }
    for (size_t i = 0; i < params.size(); ++i) {
      if (out.scales) out.scales[i] = params[i].scale;
      if (out.scale_codes) out.scale_codes[i] = params[i].scale_code;
      if (out.zeros) out.zeros[i] = params[i].zero;
    }
    if (out.global_scale && f.global_scale) *out.global_scale = g;
    if (report) {
      rep.loss = quadratic_loss(w, dq, h, ldh);
      *report = rep;
    }
  } catch (const std::bad_alloc&) {
    return Status::invalid("w: could not allocate the GPTQ working memory for a [{}, {}] weight", rows, cols);
  }
  return {};
}

}  // namespace v0
}  // namespace moequant
