// Host implementation of compaction and its adjoint.
#include <cstring>

#include "adsc/compact.h"
#include "compact_impl.h"

namespace adsc {
namespace {

// IEEE half <-> float with round-to-nearest-even, so the host path needs no compiler extension.
float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
  if (exp == 0 && mant == 0) {
    bits = sign;
  } else if (exp == 0) {  // subnormal: normalise
    exp = 113;
    while ((mant & 0x400u) == 0) { mant <<= 1; --exp; }
    bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t mant = x & 0x7fffffu;
  const int32_t exp = static_cast<int32_t>((x >> 23) & 0xffu);
  if (exp == 0xff) return static_cast<uint16_t>(sign | 0x7c00u | (mant ? 0x200u | (mant >> 13) : 0));
  const int32_t e = exp - 112;
  if (e >= 0x1f) return static_cast<uint16_t>(sign | 0x7c00u);
  if (e <= 0) {  // half subnormal (or zero)
    if (e < -10) return static_cast<uint16_t>(sign);
    mant |= 0x800000u;
    const int shift = 14 - e;
    uint32_t h = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1), halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (h & 1u))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  uint32_t h = sign | (static_cast<uint32_t>(e) << 10) | (mant >> 13);
  const uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry correctly bumps the exponent
  return static_cast<uint16_t>(h);
}

float bf16_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // NaN
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}

// Every index[i] (i < n) is -1 or in [0, limit): checked before anything is written.
template <typename Index>
Status check_indices(const char* what, const Index* index, int64_t n, int64_t limit) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t j = static_cast<int64_t>(index[i]);
    if (j < -1 || j >= limit)
      return fail(Status::kIndexOutOfRange, "%s: index[%lld] = %lld is out of range: expected "
                  "-1 (padding) or 0 <= index < %lld", what, static_cast<long long>(i),
                  static_cast<long long>(j), static_cast<long long>(limit));
  }
  return Status::kOk;
}

template <typename Index>
Status gather(const CompactTokensParams& p) {
  const Index* index = static_cast<const Index*>(p.index);
  ADSC_RETURN_IF_ERROR(check_indices("compact", index, p.dst_rows, p.src_rows));
  if (p.row_bytes == 0) return Status::kOk;  // src and dst may be NULL: nothing to copy
  const char* src = static_cast<const char*>(p.src);
  char* dst = static_cast<char*>(p.dst);
  for (int64_t i = 0; i < p.dst_rows; ++i) {
    const int64_t j = static_cast<int64_t>(index[i]);
    char* out = dst + i * p.dst_row_stride;
    if (j < 0) std::memset(out, 0, static_cast<size_t>(p.row_bytes));
    else std::memcpy(out, src + j * p.src_row_stride, static_cast<size_t>(p.row_bytes));
  }
  return Status::kOk;
}

template <typename T, typename Index, typename Load, typename Store>
void scatter_add(const ScatterAddRowsParams& p, Load load, Store store) {
  const T* src = static_cast<const T*>(p.src);
  T* dst = static_cast<T*>(p.dst);
  const Index* index = static_cast<const Index*>(p.index);
  for (int64_t i = 0; i < p.src_rows; ++i) {
    const int64_t j = static_cast<int64_t>(index[i]);
    if (j < 0) continue;
    const T* in = src + i * p.src_row_stride;
    T* out = dst + j * p.dst_row_stride;
    for (int64_t k = 0; k < p.row_elems; ++k) out[k] = store(load(out[k]) + load(in[k]));
  }
}

template <typename Index>
Status scatter_add_typed(const ScatterAddRowsParams& p) {
  ADSC_RETURN_IF_ERROR(check_indices("scatter_add", static_cast<const Index*>(p.index),
                                     p.src_rows, p.dst_rows));
  if (p.row_elems == 0) return Status::kOk;
  auto same_f = [](float v) { return v; };
  auto same_d = [](double v) { return v; };
  switch (p.dtype) {
    case DType::kFloat32: scatter_add<float, Index>(p, same_f, same_f); break;
    case DType::kFloat64: scatter_add<double, Index>(p, same_d, same_d); break;
    case DType::kFloat16: scatter_add<uint16_t, Index>(p, half_to_float, float_to_half); break;
    case DType::kBFloat16: scatter_add<uint16_t, Index>(p, bf16_to_float, float_to_bf16); break;
  }
  return Status::kOk;
}

}  // namespace

Status compact_tokens_cpu(const CompactTokensParams& p) noexcept {
  ADSC_RETURN_IF_ERROR(detail::check_compact_params(p));
  return p.index_is_int64 ? gather<int64_t>(p) : gather<int32_t>(p);
}

Status scatter_add_rows_cpu(const ScatterAddRowsParams& p) noexcept {
  ADSC_RETURN_IF_ERROR(detail::check_scatter_params(p));
  return p.index_is_int64 ? scatter_add_typed<int64_t>(p) : scatter_add_typed<int32_t>(p);
}

}  // namespace adsc
