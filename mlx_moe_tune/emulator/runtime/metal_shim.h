// Metal dialect on the emulator: address spaces vanish, Metal types / metal:: library / SIMD-group
// functions / simdgroup_matrix are provided on top of runtime.h. Threadgroup *declarations*
// (`threadgroup T buf[N];`) are rewritten by kernel.py into per-group arena slots before this
// header's `threadgroup` macro erases the qualifier everywhere else.
#pragma once
#include "runtime.h"

#define device
#define constant
#define threadgroup
#define thread
#define METAL_FUNC inline __attribute__((always_inline))
#define METAL_CONST constexpr
#define STEEL_CONST static constexpr constant
#define STEEL_PRAGMA_UNROLL _Pragma("GCC unroll 16")
#define MLX_MTL_CONST static constant constexpr const
#define MLX_MTL_PRAGMA_UNROLL _Pragma("GCC unroll 16")

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;

namespace metal {

using half = ::mmt_emu::F16<0>;
using bfloat = ::mmt_emu::F16<1>;

// ---------------------------------------------------------------------------------------------
// vectors
// ---------------------------------------------------------------------------------------------
template <class T, int N>
struct vec;

template <class T, int N, class V, int... I>
struct swz {
  T d_[N];
  using out = vec<T, int(sizeof...(I))>;
  MMT_EMU_INLINE operator out() const { return out(d_[I]...); }
  MMT_EMU_INLINE swz& operator=(const out& o) {
    int k = 0;
    ((d_[I] = o[k++]), ...);
    return *this;
  }
};

template <class T>
MMT_EMU_INLINE constexpr int vlen(const T*) { return 1; }

#define MMT_VEC_COMMON(N)                                                                          \
  vec() = default;                                                                                 \
  template <class U, std::enable_if_t<std::is_arithmetic_v<U> || ::mmt_emu::is_f16<U>::value, int> = 0> \
  MMT_EMU_INLINE vec(U s) {                                                                        \
    for (int i = 0; i < N; i++) v_[i] = T(s);                                                      \
  }                                                                                                \
  template <class U>                                                                               \
  MMT_EMU_INLINE explicit vec(const vec<U, N>& o) {                                                \
    for (int i = 0; i < N; i++) v_[i] = T(o[i]);                                                   \
  }                                                                                                \
  template <class A0, class A1, class... A>                                                        \
  MMT_EMU_INLINE vec(A0 a0, A1 a1, A... a) {                                                       \
    int k = 0;                                                                                     \
    put(k, a0);                                                                                    \
    put(k, a1);                                                                                    \
    (put(k, a), ...);                                                                              \
  }                                                                                                \
  template <class U>                                                                               \
  MMT_EMU_INLINE void put(int& k, const U& s) {                                                    \
    if constexpr (std::is_arithmetic_v<U> || ::mmt_emu::is_f16<U>::value) {                        \
      v_[k++] = T(s);                                                                              \
    } else {                                                                                       \
      auto t = static_cast<typename U::out_type>(s);                                               \
      for (int i = 0; i < t.size(); i++) v_[k++] = T(t[i]);                                        \
    }                                                                                              \
  }                                                                                                \
  using out_type = vec;                                                                            \
  using value_type = T;                                                                            \
  static constexpr int size() { return N; }                                                        \
  MMT_EMU_INLINE T& operator[](int i) { return v_[i]; }                                            \
  MMT_EMU_INLINE const T& operator[](int i) const { return v_[i]; }                                \
  MMT_EMU_VEC_OPS(N)

#define MMT_EMU_VEC_BIN(OP)                                                                        \
  friend MMT_EMU_INLINE vec operator OP(const vec& a, const vec& b) {                              \
    vec r;                                                                                         \
    for (int i = 0; i < size(); i++) r.v_[i] = T(a.v_[i] OP b.v_[i]);                              \
    return r;                                                                                      \
  }                                                                                                \
  MMT_EMU_INLINE vec& operator OP##=(const vec& b) { return *this = *this OP b; }
#define MMT_EMU_VEC_CMP(OP)                                                                        \
  friend MMT_EMU_INLINE vec<bool, size()> operator OP(const vec& a, const vec& b) {               \
    vec<bool, size()> r;                                                                           \
    for (int i = 0; i < size(); i++) r[i] = a.v_[i] OP b.v_[i];                                    \
    return r;                                                                                      \
  }
#define MMT_EMU_VEC_OPS(N)                                                                         \
  MMT_EMU_VEC_BIN(+)                                                                               \
  MMT_EMU_VEC_BIN(-)                                                                               \
  MMT_EMU_VEC_BIN(*)                                                                               \
  MMT_EMU_VEC_BIN(/)                                                                               \
  friend MMT_EMU_INLINE vec operator-(const vec& a) {                                              \
    vec r;                                                                                         \
    for (int i = 0; i < N; i++) r.v_[i] = -a.v_[i];                                                \
    return r;                                                                                      \
  }                                                                                                \
  MMT_EMU_VEC_CMP(==)                                                                              \
  MMT_EMU_VEC_CMP(!=)                                                                              \
  MMT_EMU_VEC_CMP(<)                                                                               \
  MMT_EMU_VEC_CMP(<=)                                                                              \
  MMT_EMU_VEC_CMP(>)                                                                               \
  MMT_EMU_VEC_CMP(>=)

// integer-only ops are added per instantiation through templates below
template <class T>
struct vec<T, 2> {
  union {
    T v_[2];
    struct { T x, y; };
    struct { T r, g; };
    swz<T, 2, vec, 0, 1> xy;
    swz<T, 2, vec, 1, 0> yx;
    swz<T, 2, vec, 0, 0> xx;
    swz<T, 2, vec, 1, 1> yy;
  };
  MMT_VEC_COMMON(2)
};
template <class T>
struct vec<T, 3> {
  union {
    T v_[3];
    struct { T x, y, z; };
    struct { T r, g, b; };
    swz<T, 3, vec<T, 2>, 0, 1> xy;
    swz<T, 3, vec<T, 2>, 1, 2> yz;
    swz<T, 3, vec<T, 2>, 0, 2> xz;
    swz<T, 3, vec, 0, 1, 2> xyz;
    swz<T, 3, vec, 2, 1, 0> zyx;
  };
  MMT_VEC_COMMON(3)
};
template <class T>
struct vec<T, 4> {
  union {
    T v_[4];
    struct { T x, y, z, w; };
    struct { T r, g, b, a; };
    swz<T, 4, vec<T, 2>, 0, 1> xy;
    swz<T, 4, vec<T, 2>, 2, 3> zw;
    swz<T, 4, vec<T, 2>, 1, 2> yz;
    swz<T, 4, vec<T, 2>, 0, 2> xz;
    swz<T, 4, vec<T, 2>, 1, 3> yw;
    swz<T, 4, vec<T, 3>, 0, 1, 2> xyz;
    swz<T, 4, vec<T, 3>, 1, 2, 3> yzw;
    swz<T, 4, vec, 0, 1, 2, 3> xyzw;
    swz<T, 4, vec, 3, 2, 1, 0> wzyx;
  };
  MMT_VEC_COMMON(4)
};
template <class T, int N>
struct vec {
  T v_[N];
  MMT_VEC_COMMON(N)
};

#define MMT_EMU_VEC_IOP(OP)                                                                        \
  template <class T, int N, std::enable_if_t<std::is_integral_v<T>, int> = 0>                     \
  MMT_EMU_INLINE vec<T, N> operator OP(const vec<T, N>& a, const vec<T, N>& b) {                   \
    vec<T, N> r;                                                                                   \
    for (int i = 0; i < N; i++) r[i] = T(a[i] OP b[i]);                                            \
    return r;                                                                                      \
  }                                                                                                \
  template <class T, int N, class U, std::enable_if_t<std::is_integral_v<T> && std::is_integral_v<U>, int> = 0> \
  MMT_EMU_INLINE vec<T, N> operator OP(const vec<T, N>& a, U b) {                                  \
    vec<T, N> r;                                                                                   \
    for (int i = 0; i < N; i++) r[i] = T(a[i] OP b);                                               \
    return r;                                                                                      \
  }
MMT_EMU_VEC_IOP(&)
MMT_EMU_VEC_IOP(|)
MMT_EMU_VEC_IOP(^)
MMT_EMU_VEC_IOP(<<)
MMT_EMU_VEC_IOP(>>)
MMT_EMU_VEC_IOP(%)
#undef MMT_EMU_VEC_IOP

template <class T, int N>
MMT_EMU_INLINE T dot(const vec<T, N>& a, const vec<T, N>& b) {
  T s = T(0);
  for (int i = 0; i < N; i++) s += a[i] * b[i];
  return s;
}

}  // namespace metal

#define MMT_EMU_VEC_TYPES(T, NAME)      \
  typedef metal::vec<T, 2> NAME##2;     \
  typedef metal::vec<T, 3> NAME##3;     \
  typedef metal::vec<T, 4> NAME##4;     \
  typedef metal::vec<T, 2> packed_##NAME##2; \
  typedef metal::vec<T, 3> packed_##NAME##3; \
  typedef metal::vec<T, 4> packed_##NAME##4;
typedef metal::half half;
typedef metal::bfloat bfloat;
typedef metal::half float16_t;
typedef metal::bfloat bfloat16_t;
MMT_EMU_VEC_TYPES(float, float)
MMT_EMU_VEC_TYPES(half, half)
MMT_EMU_VEC_TYPES(bfloat, bfloat)
MMT_EMU_VEC_TYPES(int, int)
MMT_EMU_VEC_TYPES(uint, uint)
MMT_EMU_VEC_TYPES(short, short)
MMT_EMU_VEC_TYPES(ushort, ushort)
MMT_EMU_VEC_TYPES(char, char)
MMT_EMU_VEC_TYPES(uchar, uchar)
MMT_EMU_VEC_TYPES(bool, bool)
MMT_EMU_VEC_TYPES(long, long)
MMT_EMU_VEC_TYPES(ulong, ulong)
#undef MMT_EMU_VEC_TYPES

namespace metal {

// ---------------------------------------------------------------------------------------------
// bit casts, math
// ---------------------------------------------------------------------------------------------
template <class To, class From>
MMT_EMU_INLINE To as_type(const From& v) {
  static_assert(sizeof(To) == sizeof(From), "as_type: sizes differ");
  To r;
  memcpy(&r, &v, sizeof(To));
  return r;
}

template <class T>
using mathf_t = std::conditional_t<::mmt_emu::is_f16<T>::value || std::is_integral_v<T>, float, T>;

#define MMT_EMU_MATH1(NAME, EXPR)                                                                 \
  template <class T, std::enable_if_t<std::is_arithmetic_v<T> || ::mmt_emu::is_f16<T>::value, int> = 0> \
  MMT_EMU_INLINE T NAME(T v) {                                                                    \
    using F = mathf_t<T>;                                                                         \
    F x = F(v);                                                                                   \
    (void)x;                                                                                      \
    return T(EXPR);                                                                               \
  }                                                                                               \
  template <class T, int N>                                                                       \
  MMT_EMU_INLINE vec<T, N> NAME(const vec<T, N>& v) {                                             \
    vec<T, N> r;                                                                                  \
    for (int i = 0; i < N; i++) r[i] = NAME(v[i]);                                                \
    return r;                                                                                     \
  }
MMT_EMU_MATH1(exp, std::exp(x))
MMT_EMU_MATH1(exp2, std::exp2(x))
MMT_EMU_MATH1(exp10, std::pow(F(10), x))
MMT_EMU_MATH1(log, std::log(x))
MMT_EMU_MATH1(log2, std::log2(x))
MMT_EMU_MATH1(log10, std::log10(x))
MMT_EMU_MATH1(log1p, std::log1p(x))
MMT_EMU_MATH1(expm1, std::expm1(x))
MMT_EMU_MATH1(sqrt, std::sqrt(x))
MMT_EMU_MATH1(rsqrt, F(1) / std::sqrt(x))
MMT_EMU_MATH1(fabs, std::fabs(x))
MMT_EMU_MATH1(floor, std::floor(x))
MMT_EMU_MATH1(ceil, std::ceil(x))
MMT_EMU_MATH1(round, std::round(x))
MMT_EMU_MATH1(rint, std::rint(x))
MMT_EMU_MATH1(trunc, std::trunc(x))
MMT_EMU_MATH1(sin, std::sin(x))
MMT_EMU_MATH1(cos, std::cos(x))
MMT_EMU_MATH1(tan, std::tan(x))
MMT_EMU_MATH1(tanh, std::tanh(x))
MMT_EMU_MATH1(sinh, std::sinh(x))
MMT_EMU_MATH1(cosh, std::cosh(x))
MMT_EMU_MATH1(asin, std::asin(x))
MMT_EMU_MATH1(acos, std::acos(x))
MMT_EMU_MATH1(atan, std::atan(x))
MMT_EMU_MATH1(erf, std::erf(x))
MMT_EMU_MATH1(saturate, std::fmin(std::fmax(x, F(0)), F(1)))
MMT_EMU_MATH1(fract, x - std::floor(x))
#undef MMT_EMU_MATH1

template <class T>
MMT_EMU_INLINE T abs(T v) {
  if constexpr (std::is_integral_v<T>) return v < 0 ? T(-v) : v;
  else return T(std::fabs(float(v)));
}
template <class T, int N>
MMT_EMU_INLINE vec<T, N> abs(const vec<T, N>& v) {
  vec<T, N> r;
  for (int i = 0; i < N; i++) r[i] = abs(v[i]);
  return r;
}
template <class T>
MMT_EMU_INLINE bool isnan(T v) { return std::isnan(float(v)); }
template <class T>
MMT_EMU_INLINE bool isinf(T v) { return std::isinf(float(v)); }
template <class T>
MMT_EMU_INLINE bool isfinite(T v) { return std::isfinite(float(v)); }
template <class T>
MMT_EMU_INLINE bool signbit(T v) { return std::signbit(float(v)); }

template <class A, class B>
MMT_EMU_INLINE A min(A a, B b) { return A(b) < a ? A(b) : a; }
template <class A, class B>
MMT_EMU_INLINE A max(A a, B b) { return a < A(b) ? A(b) : a; }
template <class T, int N>
MMT_EMU_INLINE vec<T, N> min(const vec<T, N>& a, const vec<T, N>& b) {
  vec<T, N> r;
  for (int i = 0; i < N; i++) r[i] = min(a[i], b[i]);
  return r;
}
template <class T, int N>
MMT_EMU_INLINE vec<T, N> max(const vec<T, N>& a, const vec<T, N>& b) {
  vec<T, N> r;
  for (int i = 0; i < N; i++) r[i] = max(a[i], b[i]);
  return r;
}
template <class T>
MMT_EMU_INLINE T fmin(T a, T b) { return T(std::fmin(float(a), float(b))); }
template <class T>
MMT_EMU_INLINE T fmax(T a, T b) { return T(std::fmax(float(a), float(b))); }
template <class T, class L, class H>
MMT_EMU_INLINE T clamp(T x, L lo, H hi) { return min(max(x, T(lo)), T(hi)); }
template <class T>
MMT_EMU_INLINE T fma(T a, T b, T c) {
  if constexpr (std::is_same_v<T, double>) return std::fma(a, b, c);
  else return T(std::fma(float(a), float(b), float(c)));
}
template <class T, int N>
MMT_EMU_INLINE vec<T, N> fma(const vec<T, N>& a, const vec<T, N>& b, const vec<T, N>& c) {
  vec<T, N> r;
  for (int i = 0; i < N; i++) r[i] = fma(a[i], b[i], c[i]);
  return r;
}
template <class T>
MMT_EMU_INLINE T pow(T a, T b) { return T(std::pow(float(a), float(b))); }
template <class T>
MMT_EMU_INLINE T powr(T a, T b) { return T(std::pow(float(a), float(b))); }
template <class T>
MMT_EMU_INLINE T fmod(T a, T b) { return T(std::fmod(float(a), float(b))); }
template <class T>
MMT_EMU_INLINE T copysign(T a, T b) { return T(std::copysign(float(a), float(b))); }
template <class T>
MMT_EMU_INLINE T atan2(T a, T b) { return T(std::atan2(float(a), float(b))); }
template <class T>
MMT_EMU_INLINE T select(T a, T b, bool c) { return c ? b : a; }
template <class T, int N>
MMT_EMU_INLINE vec<T, N> select(const vec<T, N>& a, const vec<T, N>& b, const vec<bool, N>& c) {
  vec<T, N> r;
  for (int i = 0; i < N; i++) r[i] = c[i] ? b[i] : a[i];
  return r;
}
template <class T, int N>
MMT_EMU_INLINE bool all(const vec<T, N>& v) {
  for (int i = 0; i < N; i++) if (!v[i]) return false;
  return true;
}
template <class T, int N>
MMT_EMU_INLINE bool any(const vec<T, N>& v) {
  for (int i = 0; i < N; i++) if (v[i]) return true;
  return false;
}
MMT_EMU_INLINE bool all(bool v) { return v; }
MMT_EMU_INLINE bool any(bool v) { return v; }
template <class T>
MMT_EMU_INLINE T popcount(T v) { return T(__builtin_popcountll((unsigned long long)v)); }
template <class T>
MMT_EMU_INLINE T clz(T v) {
  return v == 0 ? T(sizeof(T) * 8) : T(__builtin_clzll((unsigned long long)v) - (64 - int(sizeof(T) * 8)));
}
template <class T>
MMT_EMU_INLINE T ctz(T v) { return v == 0 ? T(sizeof(T) * 8) : T(__builtin_ctzll((unsigned long long)v)); }
template <class T>
MMT_EMU_INLINE T extract_bits(T x, uint offset, uint bits) {
  return bits == 0 ? T(0) : T((x >> offset) & ((bits >= sizeof(T) * 8) ? T(~T(0)) : T((T(1) << bits) - 1)));
}
template <class T>
MMT_EMU_INLINE T mulhi(T a, T b) {
  return T(((long long)(std::make_signed_t<T>)a * (long long)(std::make_signed_t<T>)b) >> (sizeof(T) * 8));
}

namespace precise {
using metal::abs;
using metal::exp;
using metal::exp2;
using metal::fabs;
using metal::log;
using metal::log2;
using metal::rsqrt;
using metal::sqrt;
using metal::tanh;
using metal::sin;
using metal::cos;
using metal::pow;
using metal::fma;
using metal::min;
using metal::max;
using metal::fmin;
using metal::fmax;
template <class T>
MMT_EMU_INLINE T divide(T a, T b) { return a / b; }
}  // namespace precise
namespace fast {
using metal::abs;
using metal::exp;
using metal::exp2;
using metal::fabs;
using metal::log;
using metal::log2;
using metal::rsqrt;
using metal::sqrt;
using metal::tanh;
using metal::sin;
using metal::cos;
using metal::pow;
using metal::fma;
using metal::min;
using metal::max;
using metal::fmin;
using metal::fmax;
template <class T>
MMT_EMU_INLINE T divide(T a, T b) { return a / b; }
}  // namespace fast

template <class T>
struct numeric_limits {
  static constexpr T max() { return std::numeric_limits<T>::max(); }
  static constexpr T min() { return std::numeric_limits<T>::min(); }
  static constexpr T lowest() { return std::numeric_limits<T>::lowest(); }
  static constexpr T infinity() { return std::numeric_limits<T>::infinity(); }
  static constexpr T epsilon() { return std::numeric_limits<T>::epsilon(); }
};
template <>
struct numeric_limits<half> {
  static constexpr half max() { return half::from_bits(0x7bff); }
  static constexpr half min() { return half::from_bits(0x0400); }
  static constexpr half lowest() { return half::from_bits(0xfbff); }
  static constexpr half infinity() { return half::from_bits(0x7c00); }
  static constexpr half epsilon() { return half::from_bits(0x1400); }
};
template <>
struct numeric_limits<bfloat> {
  static constexpr bfloat max() { return bfloat::from_bits(0x7f7f); }
  static constexpr bfloat min() { return bfloat::from_bits(0x0080); }
  static constexpr bfloat lowest() { return bfloat::from_bits(0xff7f); }
  static constexpr bfloat infinity() { return bfloat::from_bits(0x7f80); }
  static constexpr bfloat epsilon() { return bfloat::from_bits(0x3c00); }
};

// ---------------------------------------------------------------------------------------------
// barriers and SIMD-group functions
// ---------------------------------------------------------------------------------------------
struct mem_flags {
  enum : uint { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4, mem_threadgroup_imageblock = 8 };
};
enum memory_order { memory_order_relaxed, memory_order_acquire, memory_order_release, memory_order_acq_rel, memory_order_seq_cst };

MMT_EMU_INLINE void threadgroup_barrier(uint = 0) { ::mmt_emu::barrier("threadgroup_barrier"); }
MMT_EMU_INLINE void mmt_threadgroup_barrier_at(int line, uint = 0) { ::mmt_emu::barrier("threadgroup_barrier", line); }
#define threadgroup_barrier(...) mmt_threadgroup_barrier_at(__LINE__, ##__VA_ARGS__)
MMT_EMU_INLINE void simdgroup_barrier(uint = 0) { ::mmt_emu::coll_sync(0, "simdgroup_barrier"); }

template <class T>
using is_scalar_t = std::bool_constant<std::is_arithmetic_v<T> || ::mmt_emu::is_f16<T>::value>;

#define MMT_EMU_SIMD_REDUCE(NAME, OP, QUAD)                                                        \
  template <class T, std::enable_if_t<is_scalar_t<T>::value, int> = 0>                            \
  MMT_EMU_INLINE T NAME(T v) { return ::mmt_emu::coll_reduce<T, OP, QUAD>(v, 0, #NAME); }          \
  template <class T, int N>                                                                        \
  MMT_EMU_INLINE vec<T, N> NAME(vec<T, N> v) {                                                     \
    for (int i = 0; i < N; i++) v[i] = ::mmt_emu::coll_reduce<T, OP, QUAD>(v[i], 0, #NAME);        \
    return v;                                                                                      \
  }
MMT_EMU_SIMD_REDUCE(simd_sum, ::mmt_emu::R_SUM, false)
MMT_EMU_SIMD_REDUCE(simd_product, ::mmt_emu::R_PROD, false)
MMT_EMU_SIMD_REDUCE(simd_min, ::mmt_emu::R_MIN, false)
MMT_EMU_SIMD_REDUCE(simd_max, ::mmt_emu::R_MAX, false)
MMT_EMU_SIMD_REDUCE(simd_and, ::mmt_emu::R_AND, false)
MMT_EMU_SIMD_REDUCE(simd_or, ::mmt_emu::R_OR, false)
MMT_EMU_SIMD_REDUCE(simd_xor, ::mmt_emu::R_XOR, false)
MMT_EMU_SIMD_REDUCE(quad_sum, ::mmt_emu::R_SUM, true)
MMT_EMU_SIMD_REDUCE(quad_product, ::mmt_emu::R_PROD, true)
MMT_EMU_SIMD_REDUCE(quad_min, ::mmt_emu::R_MIN, true)
MMT_EMU_SIMD_REDUCE(quad_max, ::mmt_emu::R_MAX, true)
MMT_EMU_SIMD_REDUCE(quad_and, ::mmt_emu::R_AND, true)
MMT_EMU_SIMD_REDUCE(quad_or, ::mmt_emu::R_OR, true)
MMT_EMU_SIMD_REDUCE(quad_xor, ::mmt_emu::R_XOR, true)
#undef MMT_EMU_SIMD_REDUCE

#define MMT_EMU_SIMD_SCAN(NAME, INCL, OP, QUAD)                                                    \
  template <class T, std::enable_if_t<is_scalar_t<T>::value, int> = 0>                            \
  MMT_EMU_INLINE T NAME(T v) { return ::mmt_emu::coll_scan<T, INCL, OP, QUAD>(v, 0, #NAME); }      \
  template <class T, int N>                                                                        \
  MMT_EMU_INLINE vec<T, N> NAME(vec<T, N> v) {                                                     \
    for (int i = 0; i < N; i++) v[i] = ::mmt_emu::coll_scan<T, INCL, OP, QUAD>(v[i], 0, #NAME);    \
    return v;                                                                                      \
  }
MMT_EMU_SIMD_SCAN(simd_prefix_inclusive_sum, true, ::mmt_emu::R_SUM, false)
MMT_EMU_SIMD_SCAN(simd_prefix_exclusive_sum, false, ::mmt_emu::R_SUM, false)
MMT_EMU_SIMD_SCAN(simd_prefix_inclusive_product, true, ::mmt_emu::R_PROD, false)
MMT_EMU_SIMD_SCAN(simd_prefix_exclusive_product, false, ::mmt_emu::R_PROD, false)
MMT_EMU_SIMD_SCAN(quad_prefix_inclusive_sum, true, ::mmt_emu::R_SUM, true)
MMT_EMU_SIMD_SCAN(quad_prefix_exclusive_sum, false, ::mmt_emu::R_SUM, true)
MMT_EMU_SIMD_SCAN(quad_prefix_inclusive_product, true, ::mmt_emu::R_PROD, true)
MMT_EMU_SIMD_SCAN(quad_prefix_exclusive_product, false, ::mmt_emu::R_PROD, true)
#undef MMT_EMU_SIMD_SCAN

#define MMT_EMU_SIMD_SHUF(NAME, MODE, WIDTH)                                                       \
  template <class T, std::enable_if_t<is_scalar_t<T>::value, int> = 0>                            \
  MMT_EMU_INLINE T NAME(T v, ushort p) { return ::mmt_emu::coll_shuffle<T, MODE>(v, int(p), WIDTH, 0, #NAME); } \
  template <class T, int N>                                                                        \
  MMT_EMU_INLINE vec<T, N> NAME(vec<T, N> v, ushort p) {                                           \
    for (int i = 0; i < N; i++) v[i] = ::mmt_emu::coll_shuffle<T, MODE>(v[i], int(p), WIDTH, 0, #NAME); \
    return v;                                                                                      \
  }
MMT_EMU_SIMD_SHUF(simd_shuffle, 0, 32)
MMT_EMU_SIMD_SHUF(simd_broadcast, 0, 32)
MMT_EMU_SIMD_SHUF(simd_shuffle_down, 1, 32)
MMT_EMU_SIMD_SHUF(simd_shuffle_up, 2, 32)
MMT_EMU_SIMD_SHUF(simd_shuffle_xor, 3, 32)
MMT_EMU_SIMD_SHUF(simd_shuffle_rotate_down, 4, 32)
MMT_EMU_SIMD_SHUF(simd_shuffle_rotate_up, 5, 32)
MMT_EMU_SIMD_SHUF(quad_shuffle, 0, 4)
MMT_EMU_SIMD_SHUF(quad_broadcast, 0, 4)
MMT_EMU_SIMD_SHUF(quad_shuffle_down, 1, 4)
MMT_EMU_SIMD_SHUF(quad_shuffle_up, 2, 4)
MMT_EMU_SIMD_SHUF(quad_shuffle_xor, 3, 4)
MMT_EMU_SIMD_SHUF(quad_shuffle_rotate_down, 4, 4)
MMT_EMU_SIMD_SHUF(quad_shuffle_rotate_up, 5, 4)
#undef MMT_EMU_SIMD_SHUF

template <class T, std::enable_if_t<is_scalar_t<T>::value, int> = 0>
MMT_EMU_INLINE T simd_broadcast_first(T v) { return ::mmt_emu::coll_broadcast_first<T>(v, 0, "simd_broadcast_first"); }
template <class T, int N>
MMT_EMU_INLINE vec<T, N> simd_broadcast_first(vec<T, N> v) {
  for (int i = 0; i < N; i++) v[i] = ::mmt_emu::coll_broadcast_first<T>(v[i], 0, "simd_broadcast_first");
  return v;
}

struct simd_vote {
  using vote_t = ulong;
  ulong v;
  MMT_EMU_INLINE explicit constexpr simd_vote(ulong x = 0) : v(x) {}
  MMT_EMU_INLINE explicit operator ulong() const { return v; }
  MMT_EMU_INLINE bool all() const { return v == 0xffffffffull; }
  MMT_EMU_INLINE bool any() const { return v != 0; }
};
MMT_EMU_INLINE simd_vote simd_ballot(bool p) { return simd_vote(::mmt_emu::coll_ballot(p, 0, "simd_ballot")); }
MMT_EMU_INLINE simd_vote simd_active_threads_mask() { return simd_vote(::mmt_emu::coll_active(0, "simd_active_threads_mask")); }
MMT_EMU_INLINE bool simd_all(bool p) {
  const uint32_t act = ::mmt_emu::coll_active(0, "simd_all");
  return (::mmt_emu::coll_ballot(p, 0, "simd_all") & act) == act;
}
MMT_EMU_INLINE bool simd_any(bool p) { return ::mmt_emu::coll_ballot(p, 0, "simd_any") != 0; }
MMT_EMU_INLINE bool simd_is_first() {
  const uint32_t act = ::mmt_emu::coll_active(0, "simd_is_first");
  return ::mmt_emu::cur_fiber()->lane == uint32_t(__builtin_ctz(act));
}
MMT_EMU_INLINE bool quad_all(bool p) {
  const uint32_t b = ::mmt_emu::coll_ballot(p, 0, "quad_all");
  const uint32_t a = ::mmt_emu::coll_active(0, "quad_all");
  const uint32_t q = 0xfu << (::mmt_emu::cur_fiber()->lane & ~3u);
  return (b & q) == (a & q);
}
MMT_EMU_INLINE bool quad_any(bool p) {
  const uint32_t b = ::mmt_emu::coll_ballot(p, 0, "quad_any");
  return (b & (0xfu << (::mmt_emu::cur_fiber()->lane & ~3u))) != 0;
}

// ---------------------------------------------------------------------------------------------
// atomics (atomic_outputs=True gives `device atomic<T>*`)
// ---------------------------------------------------------------------------------------------
template <class T>
struct atomic {
  T v_;
};
using atomic_int = atomic<int>;
using atomic_uint = atomic<uint>;
using atomic_float = atomic<float>;
using atomic_bool = atomic<bool>;

template <class T, class U>
MMT_EMU_INLINE T atomic_fetch_add_explicit(atomic<T>* p, U v, memory_order) { return ::mmt_emu::atomic_fetch_op<T>(&p->v_, T(v), 0); }
template <class T, class U>
MMT_EMU_INLINE T atomic_fetch_sub_explicit(atomic<T>* p, U v, memory_order) { return ::mmt_emu::atomic_fetch_op<T>(&p->v_, T(v), 1); }
template <class T, class U>
MMT_EMU_INLINE T atomic_fetch_and_explicit(atomic<T>* p, U v, memory_order) { return ::mmt_emu::atomic_fetch_op<T>(&p->v_, T(v), 2); }
template <class T, class U>
MMT_EMU_INLINE T atomic_fetch_or_explicit(atomic<T>* p, U v, memory_order) { return ::mmt_emu::atomic_fetch_op<T>(&p->v_, T(v), 3); }
template <class T, class U>
MMT_EMU_INLINE T atomic_fetch_xor_explicit(atomic<T>* p, U v, memory_order) { return ::mmt_emu::atomic_fetch_op<T>(&p->v_, T(v), 4); }
template <class T, class U>
MMT_EMU_INLINE T atomic_fetch_min_explicit(atomic<T>* p, U v, memory_order) { return ::mmt_emu::atomic_fetch_op<T>(&p->v_, T(v), 5); }
template <class T, class U>
MMT_EMU_INLINE T atomic_fetch_max_explicit(atomic<T>* p, U v, memory_order) { return ::mmt_emu::atomic_fetch_op<T>(&p->v_, T(v), 6); }
template <class T, class U>
MMT_EMU_INLINE T atomic_exchange_explicit(atomic<T>* p, U v, memory_order) { return ::mmt_emu::atomic_fetch_op<T>(&p->v_, T(v), 7); }
template <class T>
MMT_EMU_INLINE T atomic_load_explicit(const atomic<T>* p, memory_order) { return ::mmt_emu::atomic_load<T>(&p->v_); }
template <class T, class U>
MMT_EMU_INLINE void atomic_store_explicit(atomic<T>* p, U v, memory_order) { ::mmt_emu::atomic_store<T>(&p->v_, T(v)); }
template <class T, class U>
MMT_EMU_INLINE bool atomic_compare_exchange_weak_explicit(atomic<T>* p, T* expected, U desired, memory_order, memory_order) {
  return ::mmt_emu::atomic_cas<T>(&p->v_, expected, T(desired));
}

// ---------------------------------------------------------------------------------------------
// simdgroup_matrix 8x8: lane l holds (fm, fn) and (fm, fn+1) with
//   qid = l / 4, fm = (qid & 4) + (l / 2) % 4, fn = (qid & 2) * 2 + (l % 2) * 2   (MLX BaseMMAFrag)
// ---------------------------------------------------------------------------------------------
MMT_EMU_INLINE int frag_m(uint l) { return int(((l / 4) & 4) + (l / 2) % 4); }
MMT_EMU_INLINE int frag_n(uint l) { return int(((l / 4) & 2) * 2 + (l % 2) * 2); }

template <class T, int R, int C>
struct simdgroup_matrix {
  static_assert(R == 8 && C == 8, "emulator: only 8x8 simdgroup_matrix is supported");
  vec<T, 2> e_;
  simdgroup_matrix() = default;
  MMT_EMU_INLINE explicit simdgroup_matrix(T diag) {  // diagonal matrix (Metal semantics)
    const uint l = ::mmt_emu::cur_fiber()->lane;
    const int m = frag_m(l), n = frag_n(l);
    e_[0] = m == n ? diag : T(0);
    e_[1] = m == n + 1 ? diag : T(0);
  }
  MMT_EMU_INLINE vec<T, 2>& thread_elements() { return e_; }
  MMT_EMU_INLINE const vec<T, 2>& thread_elements() const { return e_; }
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

template <class T, int R, int C>
MMT_EMU_INLINE simdgroup_matrix<T, R, C> make_filled_simdgroup_matrix(T v) {
  simdgroup_matrix<T, R, C> m;
  m.e_[0] = v;
  m.e_[1] = v;
  return m;
}

template <class TD, class TA, class TB, class TC>
struct MmaArgs {
  vec<TD, 2>* d;
  const vec<TA, 2>* a;
  const vec<TB, 2>* b;
  const vec<TC, 2>* c;
};

template <class TD, class TA, class TB, class TC>
MMT_EMU_RT void resolve_mma(::mmt_emu::Fiber** lanes, ::mmt_emu::Group*) {
  float A[8][8], B[8][8], Cm[8][8];
  for (int l = 0; l < 32; l++) {
    if (!lanes[l]) {
      for (int k = 0; k < 32; k++)
        if (lanes[k]) ::mmt_emu::fail_in(lanes[k], "simdgroup_multiply_accumulate needs all 32 lanes of the simdgroup; lane %d is not there", l);
    }
    auto* p = static_cast<MmaArgs<TD, TA, TB, TC>*>(lanes[l]->coll.args);
    const int m = frag_m(l), n = frag_n(l);
    for (int j = 0; j < 2; j++) {
      A[m][n + j] = float((*p->a)[j]);
      B[m][n + j] = float((*p->b)[j]);
      Cm[m][n + j] = p->c ? float((*p->c)[j]) : 0.0f;
    }
  }
  for (int l = 0; l < 32; l++) {
    auto* p = static_cast<MmaArgs<TD, TA, TB, TC>*>(lanes[l]->coll.args);
    const int m = frag_m(l), n = frag_n(l);
    for (int j = 0; j < 2; j++) {
      float acc = Cm[m][n + j];
      for (int k = 0; k < 8; k++) acc = std::fma(A[m][k], B[k][n + j], acc);
      (*p->d)[j] = TD(acc);
    }
  }
}

template <class TD, class TA, class TB, class TC>
MMT_EMU_RT void mma_collective(vec<TD, 2>* d, const vec<TA, 2>* a, const vec<TB, 2>* b, const vec<TC, 2>* c, const void* site) {
  // inputs are copied first: D may alias A, B or C
  vec<TA, 2> ca = *a;
  vec<TB, 2> cb = *b;
  vec<TC, 2> cc;
  if (c) cc = *c;
  vec<TD, 2> out;
  MmaArgs<TD, TA, TB, TC> args{&out, &ca, &cb, c ? &cc : nullptr};
  ::mmt_emu::collective(&resolve_mma<TD, TA, TB, TC>, &args, 0, site, "simdgroup_multiply_accumulate");
  *d = out;
}

template <class TD, class TA, class TB, class TC>
MMT_EMU_RT void simdgroup_multiply_accumulate(simdgroup_matrix<TD, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a,
                                               const simdgroup_matrix<TB, 8, 8>& b, const simdgroup_matrix<TC, 8, 8>& c) {
  mma_collective<TD, TA, TB, TC>(&d.e_, &a.e_, &b.e_, &c.e_, MMT_EMU_SITE);
}
template <class TD, class TA, class TB>
MMT_EMU_RT void simdgroup_multiply(simdgroup_matrix<TD, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a,
                                   const simdgroup_matrix<TB, 8, 8>& b) {
  mma_collective<TD, TA, TB, TD>(&d.e_, &a.e_, &b.e_, nullptr, MMT_EMU_SITE);
}

// loads/stores: each lane moves its own two elements (origin = (column, row) of the source)
template <class T, class U>
MMT_EMU_INLINE void simdgroup_load(simdgroup_matrix<T, 8, 8>& d, const U* src, ulong elements_per_row = 8,
                                   vec<ulong, 2> origin = vec<ulong, 2>(0ul), bool transpose = false) {
  const uint l = ::mmt_emu::cur_fiber()->lane;
  const long m = frag_m(l), n = frag_n(l);
  for (int j = 0; j < 2; j++) {
    const long r = transpose ? n + j : m, c = transpose ? m : n + j;
    d.e_[j] = T(src[(long(origin[1]) + r) * long(elements_per_row) + long(origin[0]) + c]);
  }
}
template <class T, class U>
MMT_EMU_INLINE void simdgroup_store(const simdgroup_matrix<T, 8, 8>& s, U* dst, ulong elements_per_row = 8,
                                    vec<ulong, 2> origin = vec<ulong, 2>(0ul), bool transpose = false) {
  const uint l = ::mmt_emu::cur_fiber()->lane;
  const long m = frag_m(l), n = frag_n(l);
  for (int j = 0; j < 2; j++) {
    const long r = transpose ? n + j : m, c = transpose ? m : n + j;
    dst[(long(origin[1]) + r) * long(elements_per_row) + long(origin[0]) + c] = U(s.e_[j]);
  }
}

}  // namespace metal

using namespace metal;

// ---------------------------------------------------------------------------------------------
// The part of MLX's Metal utils (prepended to every metal_kernel source) that kernels use.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct Limits {
  static constexpr T max = metal::numeric_limits<T>::max();
  static constexpr T min = metal::numeric_limits<T>::min();
  static constexpr T finite_max = metal::numeric_limits<T>::max();
  static constexpr T finite_min = metal::numeric_limits<T>::lowest();
};

template <typename IdxT = int64_t>
METAL_FUNC IdxT elem_to_loc(IdxT elem, const int* shape, const int64_t* strides, int ndim) {
  IdxT loc = 0;
  for (int i = ndim - 1; i >= 0 && elem > 0; --i) {
    loc += (elem % shape[i]) * IdxT(strides[i]);
    elem /= shape[i];
  }
  return loc;
}
METAL_FUNC int64_t elem_to_loc(uint elem, const int* shape, const int64_t* strides, int ndim) {
  return elem_to_loc<int64_t>(int64_t(elem), shape, strides, ndim);
}

template <typename T>
METAL_FUNC constexpr T ceildiv(T N, T M) { return (N + M - 1) / M; }
