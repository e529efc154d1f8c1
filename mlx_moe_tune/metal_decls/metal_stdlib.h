// mlx-moe-tune: declarations of the Metal standard library for a clang front-end check.
//
// Not Apple's header: it is written from the Metal Shading Language specification (3.1/3.2)
// for one purpose, to let an ordinary clang (C++14, -nostdinc, see mlx_moe_tune/metal_check.py)
// parse MLX's JIT preamble and our kernels with Metal's typing rules:
//   - `device`, `constant` and `threadgroup` are distinct clang address spaces (1, 2, 3), and
//     `thread` is the default one (as in Metal, where locals live in `thread`), so a pointer of
//     one address space does not convert to another and a mismatch fails to compile;
//   - every builtin below takes address-space-qualified pointers exactly where Metal's does
//     (atomics, simdgroup_load/store) and value arguments elsewhere;
//   - there is no C++ standard library: only what Metal declares, in namespace metal.
// Declarations only: nothing here is ever run or code-generated (-fsyntax-only).
#pragma once
// (a system header: clang's warnings stay on for the code that uses it, not for this file)
#pragma clang system_header

#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define threadgroup __attribute__((address_space(3)))
#define thread

#define METAL_FUNC inline __attribute__((__always_inline__))
// the math-mode flag MLX's bf16_math.h passes to the __metal_* builtins
#define __METAL_MAYBE_FAST_MATH__ false
#define __METAL_FAST_MATH__ true
#define __METAL_PRECISE_MATH__ false

// ---- scalar types ---------------------------------------------------------------------------
typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;
typedef __SIZE_TYPE__ size_t;
typedef __PTRDIFF_TYPE__ ptrdiff_t;
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef short int16_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long int64_t;
typedef unsigned long uint64_t;
typedef _Float16 half;
typedef __bf16 bfloat;

// ---- vector types: clang's ext_vector_type has Metal's members and swizzles ------------------
namespace metal {
template <typename T, int N>
using vec = T __attribute__((ext_vector_type(N)));
}  // namespace metal

#define MMT_VEC_TYPES(T, NAME)                                                  \
  typedef T NAME##2 __attribute__((ext_vector_type(2)));                        \
  typedef T NAME##3 __attribute__((ext_vector_type(3)));                        \
  typedef T NAME##4 __attribute__((ext_vector_type(4)));
MMT_VEC_TYPES(float, float)
MMT_VEC_TYPES(half, half)
MMT_VEC_TYPES(bfloat, bfloat)
MMT_VEC_TYPES(int, int)
MMT_VEC_TYPES(uint, uint)
MMT_VEC_TYPES(short, short)
MMT_VEC_TYPES(ushort, ushort)
MMT_VEC_TYPES(char, char)
MMT_VEC_TYPES(uchar, uchar)
MMT_VEC_TYPES(bool, bool)
MMT_VEC_TYPES(long, long)
MMT_VEC_TYPES(ulong, ulong)
#undef MMT_VEC_TYPES

// half and bfloat literals (Metal's `h`/`H` and `bf` suffixes: 1.0h, 0.5bf)
constexpr half operator""h(long double v) { return static_cast<half>(static_cast<float>(v)); }
constexpr half operator""H(long double v) { return static_cast<half>(static_cast<float>(v)); }
constexpr bfloat operator""bf(long double v) { return static_cast<bfloat>(static_cast<float>(v)); }

// as_type<T>(x): reinterpret the bits of a value of the same size (Metal 2.1.x, "as_type")
template <typename T, typename U>
METAL_FUNC T as_type(U x) {
  static_assert(sizeof(T) == sizeof(U), "as_type: the two types must have the same size");
  return __builtin_bit_cast(T, x);
}

namespace metal {

// ---- type traits (metal_type_traits) --------------------------------------------------------
template <typename T, T v>
struct integral_constant {
  static constexpr constant T value = v;
  constexpr operator T() const { return v; }
};
typedef integral_constant<bool, true> true_type;
typedef integral_constant<bool, false> false_type;
template <bool B, typename T = void> struct enable_if {};
template <typename T> struct enable_if<true, T> { typedef T type; };
template <bool B, typename T = void> using enable_if_t = typename enable_if<B, T>::type;
template <bool B, typename T, typename F> struct conditional { typedef T type; };
template <typename T, typename F> struct conditional<false, T, F> { typedef F type; };
template <bool B, typename T, typename F> using conditional_t = typename conditional<B, T, F>::type;
template <typename T, typename U> struct is_same : false_type {};
template <typename T> struct is_same<T, T> : true_type {};
template <typename T, typename U> constexpr constant bool is_same_v = is_same<T, U>::value;
template <typename T> struct remove_cv { typedef T type; };
template <typename T> struct remove_cv<const T> { typedef T type; };
template <typename T> struct remove_cv<volatile T> { typedef T type; };
template <typename T> struct remove_cv<const volatile T> { typedef T type; };
template <typename T> using remove_cv_t = typename remove_cv<T>::type;
template <typename T> struct remove_reference { typedef T type; };
template <typename T> struct remove_reference<T&> { typedef T type; };
template <typename T> using remove_reference_t = typename remove_reference<T>::type;
template <typename T> struct is_integral_base : false_type {};
#define MMT_TRAIT(TRAIT, T) template <> struct TRAIT<T> : true_type {};
MMT_TRAIT(is_integral_base, bool) MMT_TRAIT(is_integral_base, char) MMT_TRAIT(is_integral_base, signed char)
MMT_TRAIT(is_integral_base, uchar) MMT_TRAIT(is_integral_base, short) MMT_TRAIT(is_integral_base, ushort)
MMT_TRAIT(is_integral_base, int) MMT_TRAIT(is_integral_base, uint) MMT_TRAIT(is_integral_base, long)
MMT_TRAIT(is_integral_base, ulong)
template <typename T> struct is_floating_point_base : false_type {};
MMT_TRAIT(is_floating_point_base, float) MMT_TRAIT(is_floating_point_base, half)
MMT_TRAIT(is_floating_point_base, bfloat)
#undef MMT_TRAIT
template <typename T> struct is_integral : is_integral_base<remove_cv_t<T>> {};
template <typename T> struct is_floating_point : is_floating_point_base<remove_cv_t<T>> {};
template <typename T> struct is_arithmetic
    : integral_constant<bool, is_integral<T>::value || is_floating_point<T>::value> {};
template <typename T> constexpr constant bool is_integral_v = is_integral<T>::value;
template <typename T> constexpr constant bool is_floating_point_v = is_floating_point<T>::value;
template <typename T> constexpr constant bool is_arithmetic_v = is_arithmetic<T>::value;
template <typename T> struct is_signed
    : integral_constant<bool, is_arithmetic<T>::value && static_cast<T>(-1) < static_cast<T>(0)> {};
template <typename T> constexpr constant bool is_signed_v = is_signed<T>::value;
template <typename T> struct is_unsigned
    : integral_constant<bool, is_integral<T>::value && !is_signed<T>::value> {};
template <typename T> constexpr constant bool is_unsigned_v = is_unsigned<T>::value;
template <typename From, typename To> struct is_convertible
    : integral_constant<bool, __is_convertible_to(From, To)> {};
template <typename From, typename To> constexpr constant bool is_convertible_v = is_convertible<From, To>::value;

// ---- numeric_limits (metal_limits) ----------------------------------------------------------
template <typename T> struct numeric_limits;
#define MMT_INT_LIMITS(T, LO, HI)                                               \
  template <> struct numeric_limits<T> {                                        \
    static constexpr constant bool is_specialized = true;                       \
    static constexpr constant bool is_signed = static_cast<T>(-1) < static_cast<T>(0); \
    static constexpr T min() { return LO; }                                     \
    static constexpr T max() { return HI; }                                     \
    static constexpr T lowest() { return LO; }                                  \
  };
MMT_INT_LIMITS(bool, false, true)
MMT_INT_LIMITS(char, -128, 127)
MMT_INT_LIMITS(signed char, -128, 127)
MMT_INT_LIMITS(uchar, 0, 255)
MMT_INT_LIMITS(short, -32768, 32767)
MMT_INT_LIMITS(ushort, 0, 65535)
MMT_INT_LIMITS(int, -2147483647 - 1, 2147483647)
MMT_INT_LIMITS(uint, 0u, 4294967295u)
MMT_INT_LIMITS(long, -9223372036854775807l - 1, 9223372036854775807l)
MMT_INT_LIMITS(ulong, 0ul, 18446744073709551615ul)
#undef MMT_INT_LIMITS
// floating-point limits from their bit patterns (the types' binary formats)
#define MMT_FLOAT_LIMITS(T, BITS, MAXB, MINB, EPSB, INFB, NANB)                  \
  template <> struct numeric_limits<T> {                                        \
    static constexpr constant bool is_specialized = true;                       \
    static constexpr constant bool is_signed = true;                            \
    static constexpr constant bool has_infinity = true;                         \
    static constexpr constant bool has_quiet_NaN = true;                        \
    static constexpr T max() { return __builtin_bit_cast(T, (BITS)MAXB); }       \
    static constexpr T min() { return __builtin_bit_cast(T, (BITS)MINB); }       \
    static constexpr T lowest() { return -max(); }                              \
    static constexpr T epsilon() { return __builtin_bit_cast(T, (BITS)EPSB); }   \
    static constexpr T infinity() { return __builtin_bit_cast(T, (BITS)INFB); }  \
    static constexpr T quiet_NaN() { return __builtin_bit_cast(T, (BITS)NANB); } \
  };
MMT_FLOAT_LIMITS(float, uint, 0x7f7fffffu, 0x00800000u, 0x34000000u, 0x7f800000u, 0x7fc00000u)
MMT_FLOAT_LIMITS(half, ushort, 0x7bff, 0x0400, 0x1400, 0x7c00, 0x7e00)
MMT_FLOAT_LIMITS(bfloat, ushort, 0x7f7f, 0x0080, 0x3c00, 0x7f80, 0x7fc0)
#undef MMT_FLOAT_LIMITS

// ---- what a builtin accepts -----------------------------------------------------------------
// Metal declares its math for float and half (scalars and vectors), its integer builtins for
// the integer types, its SIMD-group functions for both; these traits restrict the templates
// below to the same sets (a call with bfloat, double or a struct finds no overload).
template <typename T> struct mmt_elem { typedef T type; static constexpr constant int n = 1; };
template <typename T, int N> struct mmt_elem<vec<T, N>> { typedef T type; static constexpr constant int n = N; };
template <typename T> struct mmt_is_fp : false_type {};
template <> struct mmt_is_fp<float> : true_type {};
template <> struct mmt_is_fp<half> : true_type {};
template <typename T> struct mmt_is_int : is_integral_base<T> {};
template <typename T>
using mmt_fp = enable_if_t<mmt_is_fp<typename mmt_elem<T>::type>::value, T>;
template <typename T>
using mmt_int = enable_if_t<mmt_is_int<typename mmt_elem<T>::type>::value, T>;
template <typename T>
using mmt_arith = enable_if_t<mmt_is_fp<typename mmt_elem<T>::type>::value ||
                              mmt_is_int<typename mmt_elem<T>::type>::value, T>;
template <typename T>
using mmt_bool_of = conditional_t<mmt_elem<T>::n == 1, bool, vec<bool, mmt_elem<T>::n>>;
template <typename T> struct mmt_identity { typedef T type; };

// ---- math (metal_math): metal::, metal::fast:: and metal::precise:: --------------------------
#define MMT_MATH1(F) template <typename T> METAL_FUNC mmt_fp<T> F(T x);
#define MMT_MATH2(F) template <typename T> METAL_FUNC mmt_fp<T> F(T x, T y);
#define MMT_MATH3(F) template <typename T> METAL_FUNC mmt_fp<T> F(T x, T y, T z);
#define MMT_MATH_ALL                                                                    \
  MMT_MATH1(acos) MMT_MATH1(acosh) MMT_MATH1(asin) MMT_MATH1(asinh) MMT_MATH1(atan)     \
  MMT_MATH1(atanh) MMT_MATH1(ceil) MMT_MATH1(cos) MMT_MATH1(cosh) MMT_MATH1(cospi)      \
  MMT_MATH1(exp) MMT_MATH1(exp10) MMT_MATH1(exp2) MMT_MATH1(fabs) MMT_MATH1(floor)      \
  MMT_MATH1(fract) MMT_MATH1(log) MMT_MATH1(log10) MMT_MATH1(log2) MMT_MATH1(rint)      \
  MMT_MATH1(round) MMT_MATH1(rsqrt) MMT_MATH1(sin) MMT_MATH1(sinh) MMT_MATH1(sinpi)     \
  MMT_MATH1(sqrt) MMT_MATH1(tan) MMT_MATH1(tanh) MMT_MATH1(tanpi) MMT_MATH1(trunc)      \
  MMT_MATH1(saturate) MMT_MATH1(erf)                                                    \
  MMT_MATH2(atan2) MMT_MATH2(divide) MMT_MATH2(fdim) MMT_MATH2(fmax) MMT_MATH2(fmin)    \
  MMT_MATH2(fmod) MMT_MATH2(pow) MMT_MATH2(powr) MMT_MATH2(copysign) MMT_MATH2(nextafter) \
  MMT_MATH2(step)                                                                       \
  MMT_MATH3(fma) MMT_MATH3(fmax3) MMT_MATH3(fmin3) MMT_MATH3(fmedian3) MMT_MATH3(mix)   \
  MMT_MATH3(smoothstep)                                                                 \
  template <typename T> METAL_FUNC mmt_fp<T> ldexp(T x, int k);                         \
  template <typename T> METAL_FUNC mmt_fp<T> frexp(T x, thread int& e);                 \
  template <typename T> METAL_FUNC mmt_fp<T> modf(T x, thread T& i);                    \
  template <typename T> METAL_FUNC mmt_bool_of<mmt_fp<T>> isnan(T x);                   \
  template <typename T> METAL_FUNC mmt_bool_of<mmt_fp<T>> isinf(T x);                   \
  template <typename T> METAL_FUNC mmt_bool_of<mmt_fp<T>> isfinite(T x);                \
  template <typename T> METAL_FUNC mmt_bool_of<mmt_fp<T>> signbit(T x);
MMT_MATH_ALL
namespace fast { MMT_MATH_ALL }
namespace precise { MMT_MATH_ALL }
#undef MMT_MATH_ALL
#undef MMT_MATH1
#undef MMT_MATH2
#undef MMT_MATH3

// common and integer functions, any arithmetic type
template <typename T> METAL_FUNC mmt_arith<T> abs(T x);
template <typename T> METAL_FUNC mmt_arith<T> min(T x, T y);
template <typename T> METAL_FUNC mmt_arith<T> max(T x, T y);
template <typename T> METAL_FUNC mmt_arith<T> min3(T x, T y, T z);
template <typename T> METAL_FUNC mmt_arith<T> max3(T x, T y, T z);
template <typename T> METAL_FUNC mmt_arith<T> clamp(T x, T lo, T hi);
template <typename T> METAL_FUNC mmt_arith<T> sign(T x);
template <typename T> METAL_FUNC mmt_int<T> popcount(T x);
template <typename T> METAL_FUNC mmt_int<T> clz(T x);
template <typename T> METAL_FUNC mmt_int<T> ctz(T x);
template <typename T> METAL_FUNC mmt_int<T> mulhi(T x, T y);
template <typename T> METAL_FUNC mmt_int<T> extract_bits(T x, uint offset, uint bits);
template <typename T> METAL_FUNC mmt_int<T> insert_bits(T base, T insert, uint offset, uint bits);
template <typename T> METAL_FUNC mmt_int<T> reverse_bits(T x);
template <typename T> METAL_FUNC mmt_int<T> rotate(T v, T i);
// select(a, b, c): c ? b : a; one bool per element
template <typename T> METAL_FUNC T select(T a, T b, mmt_bool_of<T> c);
template <typename T, int N> METAL_FUNC T dot(vec<T, N> x, vec<T, N> y);
template <int N> METAL_FUNC bool all(vec<bool, N> x);
template <int N> METAL_FUNC bool any(vec<bool, N> x);
METAL_FUNC bool all(bool x);
METAL_FUNC bool any(bool x);

// ---- synchronization (metal_compute) ------------------------------------------------------
enum class mem_flags : uint {
  mem_none = 0,
  mem_device = 1,
  mem_threadgroup = 2,
  mem_texture = 4,
  mem_threadgroup_imageblock = 16,
  mem_object_data = 32,
};
constexpr mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(uint(a) | uint(b)); }
void threadgroup_barrier(mem_flags flags);
void simdgroup_barrier(mem_flags flags);

// ---- SIMD-group and quad-group functions (metal_simdgroup) ----------------------------------
class simd_vote {
 public:
  typedef ulong vote_t;
  explicit constexpr simd_vote(vote_t v = 0) : v(v) {}
  explicit constexpr operator vote_t() const { return v; }
  bool all() const;
  bool any() const;
 private:
  vote_t v;
};
#define MMT_SIMD(P)                                                                      \
  template <typename T> METAL_FUNC mmt_arith<T> P##_sum(T data);                        \
  template <typename T> METAL_FUNC mmt_arith<T> P##_product(T data);                    \
  template <typename T> METAL_FUNC mmt_arith<T> P##_min(T data);                        \
  template <typename T> METAL_FUNC mmt_arith<T> P##_max(T data);                        \
  template <typename T> METAL_FUNC mmt_int<T> P##_and(T data);                          \
  template <typename T> METAL_FUNC mmt_int<T> P##_or(T data);                           \
  template <typename T> METAL_FUNC mmt_int<T> P##_xor(T data);                          \
  template <typename T> METAL_FUNC mmt_arith<T> P##_prefix_inclusive_sum(T data);       \
  template <typename T> METAL_FUNC mmt_arith<T> P##_prefix_exclusive_sum(T data);       \
  template <typename T> METAL_FUNC mmt_arith<T> P##_prefix_inclusive_product(T data);   \
  template <typename T> METAL_FUNC mmt_arith<T> P##_prefix_exclusive_product(T data);   \
  template <typename T> METAL_FUNC mmt_arith<T> P##_broadcast(T data, ushort lane);     \
  template <typename T> METAL_FUNC mmt_arith<T> P##_broadcast_first(T data);            \
  template <typename T> METAL_FUNC mmt_arith<T> P##_shuffle(T data, ushort lane);       \
  template <typename T> METAL_FUNC mmt_arith<T> P##_shuffle_down(T data, ushort delta); \
  template <typename T> METAL_FUNC mmt_arith<T> P##_shuffle_up(T data, ushort delta);   \
  template <typename T> METAL_FUNC mmt_arith<T> P##_shuffle_xor(T data, ushort mask);   \
  template <typename T> METAL_FUNC mmt_arith<T> P##_shuffle_rotate_down(T data, ushort delta); \
  template <typename T> METAL_FUNC mmt_arith<T> P##_shuffle_rotate_up(T data, ushort delta);   \
  template <typename T> METAL_FUNC mmt_arith<T> P##_shuffle_and_fill_down(T data, T fill, ushort delta); \
  template <typename T> METAL_FUNC mmt_arith<T> P##_shuffle_and_fill_down(T data, T fill, ushort delta, ushort modulo); \
  template <typename T> METAL_FUNC mmt_arith<T> P##_shuffle_and_fill_up(T data, T fill, ushort delta); \
  template <typename T> METAL_FUNC mmt_arith<T> P##_shuffle_and_fill_up(T data, T fill, ushort delta, ushort modulo); \
  METAL_FUNC simd_vote P##_ballot(bool expr);                                           \
  METAL_FUNC bool P##_all(bool expr);                                                   \
  METAL_FUNC bool P##_any(bool expr);                                                   \
  METAL_FUNC bool P##_is_first();                                                       \
  METAL_FUNC simd_vote P##_active_threads_mask();
MMT_SIMD(simd)
MMT_SIMD(quad)
#undef MMT_SIMD

// The compiler builtins behind the standard functions, as MLX's bf16_math.h calls them (for
// its bfloat overloads); internal names, so any trailing arguments (the math-mode flag) pass.
#define MMT_BUILTIN(F) template <typename T, typename... A> T __metal_##F(T x, A... rest);
MMT_BUILTIN(fabs) MMT_BUILTIN(acos) MMT_BUILTIN(acosh) MMT_BUILTIN(asin) MMT_BUILTIN(asinh)
MMT_BUILTIN(atan) MMT_BUILTIN(atan2) MMT_BUILTIN(atanh) MMT_BUILTIN(ceil) MMT_BUILTIN(cos)
MMT_BUILTIN(cosh) MMT_BUILTIN(cospi) MMT_BUILTIN(divide) MMT_BUILTIN(exp) MMT_BUILTIN(exp10)
MMT_BUILTIN(exp2) MMT_BUILTIN(floor) MMT_BUILTIN(fma) MMT_BUILTIN(fmax) MMT_BUILTIN(fmax3)
MMT_BUILTIN(fmedian3) MMT_BUILTIN(fmin) MMT_BUILTIN(fmin3) MMT_BUILTIN(fmod) MMT_BUILTIN(fract)
MMT_BUILTIN(frexp) MMT_BUILTIN(ldexp) MMT_BUILTIN(log) MMT_BUILTIN(log10) MMT_BUILTIN(log2)
MMT_BUILTIN(nextafter) MMT_BUILTIN(pow) MMT_BUILTIN(powr) MMT_BUILTIN(rint) MMT_BUILTIN(round)
MMT_BUILTIN(rsqrt) MMT_BUILTIN(sin) MMT_BUILTIN(sinh) MMT_BUILTIN(sinpi) MMT_BUILTIN(sqrt)
MMT_BUILTIN(tan) MMT_BUILTIN(tanh) MMT_BUILTIN(tanpi) MMT_BUILTIN(trunc) MMT_BUILTIN(modf)
MMT_BUILTIN(simd_broadcast) MMT_BUILTIN(simd_shuffle) MMT_BUILTIN(simd_shuffle_and_fill_down)
MMT_BUILTIN(simd_shuffle_and_fill_up) MMT_BUILTIN(simd_shuffle_down) MMT_BUILTIN(simd_shuffle_up)
MMT_BUILTIN(simd_shuffle_rotate_down) MMT_BUILTIN(simd_shuffle_rotate_up) MMT_BUILTIN(simd_shuffle_xor)
MMT_BUILTIN(simd_max) MMT_BUILTIN(simd_min) MMT_BUILTIN(simd_prefix_exclusive_product)
MMT_BUILTIN(simd_prefix_exclusive_sum) MMT_BUILTIN(simd_prefix_inclusive_product)
MMT_BUILTIN(simd_prefix_inclusive_sum) MMT_BUILTIN(simd_product) MMT_BUILTIN(simd_sum)
MMT_BUILTIN(simd_xor) MMT_BUILTIN(get_simdgroup_size)
#undef MMT_BUILTIN

// ---- atomics (metal_atomic): objects in device or threadgroup memory only -------------------
enum memory_order { memory_order_relaxed = 0, memory_order_seq_cst = 5 };
// a non-class type (clang's _Atomic), so a `threadgroup atomic_int a[N];` needs no constructor;
// like Metal's, usable only through the functions below
template <typename T>
using atomic = _Atomic(T);
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<bool> atomic_bool;
typedef atomic<float> atomic_float;
typedef atomic<ulong> atomic_ulong;
// per type, as Metal declares them (non-templates: the value argument converts)
#define MMT_ATOMIC_OP(AS, T, OP) T atomic_fetch_##OP##_explicit(volatile AS atomic<T>* object, T operand, memory_order order);
#define MMT_ATOMIC(AS, T)                                                                                \
  void atomic_store_explicit(volatile AS atomic<T>* object, T desired, memory_order order);             \
  T atomic_load_explicit(const volatile AS atomic<T>* object, memory_order order);                      \
  T atomic_exchange_explicit(volatile AS atomic<T>* object, T desired, memory_order order);             \
  bool atomic_compare_exchange_weak_explicit(volatile AS atomic<T>* object, thread T* expected, T desired, \
                                             memory_order succ, memory_order fail);                     \
  MMT_ATOMIC_OP(AS, T, add) MMT_ATOMIC_OP(AS, T, sub) MMT_ATOMIC_OP(AS, T, min) MMT_ATOMIC_OP(AS, T, max)
#define MMT_ATOMIC_BITS(AS, T) MMT_ATOMIC_OP(AS, T, and) MMT_ATOMIC_OP(AS, T, or) MMT_ATOMIC_OP(AS, T, xor)
MMT_ATOMIC(device, int) MMT_ATOMIC(device, uint) MMT_ATOMIC(device, float)
MMT_ATOMIC(threadgroup, int) MMT_ATOMIC(threadgroup, uint) MMT_ATOMIC(threadgroup, float)
MMT_ATOMIC_BITS(device, int) MMT_ATOMIC_BITS(device, uint)
MMT_ATOMIC_BITS(threadgroup, int) MMT_ATOMIC_BITS(threadgroup, uint)
#undef MMT_ATOMIC
#undef MMT_ATOMIC_BITS
#undef MMT_ATOMIC_OP

// ---- SIMD-group matrices (metal_simdgroup_matrix) --------------------------------------------
template <typename T, int Cols, int Rows>
struct simdgroup_matrix {
  static_assert(Cols == 8 && Rows == 8, "only 8x8 simdgroup matrices");
  static_assert(is_same_v<T, float> || is_same_v<T, half> || is_same_v<T, bfloat>,
                "simdgroup_matrix holds float, half or bfloat");
  simdgroup_matrix() = default;
  explicit simdgroup_matrix(T diagonal);
  // this lane's two elements (the layout MLX's steel BaseMMAFrag relies on)
  thread vec<T, 2>& thread_elements();
 private:
  vec<T, 2> e;
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;
template <typename T, int Cols, int Rows>
simdgroup_matrix<T, Cols, Rows> make_filled_simdgroup_matrix(T value);
template <typename T, int Cols, int Rows>
void simdgroup_load(thread simdgroup_matrix<T, Cols, Rows>& d, const device T* src,
                    size_t elements_per_row = Cols, ulong2 matrix_origin = 0, bool transpose_matrix = false);
template <typename T, int Cols, int Rows>
void simdgroup_load(thread simdgroup_matrix<T, Cols, Rows>& d, const threadgroup T* src,
                    size_t elements_per_row = Cols, ulong2 matrix_origin = 0, bool transpose_matrix = false);
template <typename T, int Cols, int Rows>
void simdgroup_store(thread simdgroup_matrix<T, Cols, Rows> a, device T* dst,
                     size_t elements_per_row = Cols, ulong2 matrix_origin = 0, bool transpose_matrix = false);
template <typename T, int Cols, int Rows>
void simdgroup_store(thread simdgroup_matrix<T, Cols, Rows> a, threadgroup T* dst,
                     size_t elements_per_row = Cols, ulong2 matrix_origin = 0, bool transpose_matrix = false);
// d = a * b + c (K x M = K x L times L x M); element types may differ (accumulate in d's)
template <typename TD, typename TA, typename TB, typename TC, int K, int L, int M>
void simdgroup_multiply_accumulate(thread simdgroup_matrix<TD, K, M>& d,
                                   thread const simdgroup_matrix<TA, K, L>& a,
                                   thread const simdgroup_matrix<TB, L, M>& b,
                                   thread const simdgroup_matrix<TC, K, M>& c);
template <typename TD, typename TA, typename TB, int K, int L, int M>
void simdgroup_multiply(thread simdgroup_matrix<TD, K, M>& d, thread const simdgroup_matrix<TA, K, L>& a,
                        thread const simdgroup_matrix<TB, L, M>& b);

}  // namespace metal
