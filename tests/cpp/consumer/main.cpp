// Consumer of the installed moequant package: quantize and pack a small matrix, compare with goldens.
// Exit code 0 on success; any mismatch prints what differed and exits 1.
#include <moequant/gptq.h>
#include <moequant/hessian.h>
#include <moequant/pack.h>
#include <moequant/quant.h>

#include <cstdint>
#include <cstdio>
#include <vector>

namespace mq = moequant;

int main() {
  // One row of the integers -8..7: asymmetric 4-bit per-channel quantization has scale 1 and zero 0, so the
  // codes are the values themselves and pack to the compressed-tensors goldens.
  const int64_t rows = 2, cols = 16;
  std::vector<float> w(rows * cols);
  for (int64_t c = 0; c < cols; ++c) {
    w[c] = static_cast<float>(c - 8);
    w[cols + c] = 0.0f;  // an all-zero row: scale = fp32 epsilon, codes = the zero point
  }
  mq::QuantSpec spec;
  spec.bits = 4;
  spec.symmetric = false;
  spec.group_size = -1;
  std::vector<int8_t> codes(rows * cols);
  std::vector<float> scales(rows), dq(rows * cols);
  std::vector<int32_t> zeros(rows);
  mq::Status st = mq::quantize_rtn({w.data(), rows, cols, cols}, spec, {codes.data(), scales.data(), zeros.data(), dq.data()});
  if (!st.ok()) {
    std::printf("quantize_rtn failed: %s\n", st.to_string().c_str());
    return 1;
  }
  std::vector<int32_t> packed(rows * mq::packed_words(cols, spec.bits));
  st = mq::pack_rows(codes.data(), rows, cols, spec.bits, packed.data());
  if (!st.ok()) {
    std::printf("pack_rows failed: %s\n", st.to_string().c_str());
    return 1;
  }
  const int32_t golden[4] = {0x76543210, static_cast<int32_t>(0xFEDCBA98u), 0x00000000, 0x00000000};
  int bad = 0;
  for (int i = 0; i < 4; ++i)
    if (packed[i] != golden[i]) {
      std::printf("packed[%d] = 0x%08X, expected 0x%08X\n", i, static_cast<unsigned>(packed[i]),
                  static_cast<unsigned>(golden[i]));
      ++bad;
    }
  if (scales[0] != 1.0f || zeros[0] != 0 || zeros[1] != -8) {
    std::printf("params: scale %g zero %d / %d, expected 1, 0, -8\n", scales[0], zeros[0], zeros[1]);
    ++bad;
  }
  for (int64_t i = 0; i < rows * cols; ++i)
    if (dq[i] != w[i]) {
      std::printf("dequantized[%lld] = %g, expected %g\n", static_cast<long long>(i), dq[i], w[i]);
      ++bad;
    }
  if (bad) return 1;
  std::printf("moequant consumer: ok (packed 0x%08X 0x%08X)\n", static_cast<unsigned>(packed[0]),
              static_cast<unsigned>(packed[1]));
  return 0;
}
