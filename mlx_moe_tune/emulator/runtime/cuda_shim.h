// CUDA dialect on the emulator: qualifiers vanish, threadIdx & co. come from the running fiber,
// cuda_fp16/cuda_bf16 types and intrinsics, warp functions, atomics, a subset of cooperative
// groups and of MLX's device/utils.cuh, and the mmt:: intrinsics of cuda/mmt_intrinsics.cuh
// (mma.sync m16n8k16, ldmatrix, cp.async) with PTX ISA semantics. `__shared__` declarations are
// rewritten by kernel.py into per-block arena slots.
#pragma once
#include "runtime.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __grid_constant__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __constant__ static const
#define __managed__
#define __CUDA_ARCH__ 900
#define MMT_EMU_CUDA 1

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
typedef dim3 uint3_dim;

namespace mmt_emu {
MMT_EMU_INLINE dim3 cuda_thread_idx() {
  Fiber* f = cur_fiber();
  return dim3(f->tid[0], f->tid[1], f->tid[2]);
}
MMT_EMU_INLINE dim3 cuda_block_idx() {
  Group* g = cur_fiber()->g;
  return dim3(g->pos[0], g->pos[1], g->pos[2]);
}
MMT_EMU_INLINE dim3 cuda_block_dim() {
  Launch* L = cur_fiber()->g->L;
  return dim3(L->tg[0], L->tg[1], L->tg[2]);
}
MMT_EMU_INLINE dim3 cuda_grid_dim() {
  Launch* L = cur_fiber()->g->L;
  return dim3(L->groups[0], L->groups[1], L->groups[2]);
}
}  // namespace mmt_emu
#define threadIdx (::mmt_emu::cuda_thread_idx())
#define blockIdx (::mmt_emu::cuda_block_idx())
#define blockDim (::mmt_emu::cuda_block_dim())
#define gridDim (::mmt_emu::cuda_grid_dim())
#define warpSize 32

// ---------------------------------------------------------------------------------------------
// vector structs (CUDA alignment) and make_*
// ---------------------------------------------------------------------------------------------
#define MMT_EMU_V1(T, N, A) struct __attribute__((aligned(A))) N##1 { T x; }; \
  MMT_EMU_INLINE N##1 make_##N##1(T x) { return N##1{x}; }
#define MMT_EMU_V2(T, N, A) struct __attribute__((aligned(A))) N##2 { T x, y; }; \
  MMT_EMU_INLINE N##2 make_##N##2(T x, T y) { return N##2{x, y}; }
#define MMT_EMU_V3(T, N) struct N##3 { T x, y, z; }; \
  MMT_EMU_INLINE N##3 make_##N##3(T x, T y, T z) { return N##3{x, y, z}; }
#define MMT_EMU_V4(T, N, A) struct __attribute__((aligned(A))) N##4 { T x, y, z, w; }; \
  MMT_EMU_INLINE N##4 make_##N##4(T x, T y, T z, T w) { return N##4{x, y, z, w}; }
#define MMT_EMU_VALL(T, N, S)                         \
  MMT_EMU_V1(T, N, S) MMT_EMU_V2(T, N, (2 * S)) MMT_EMU_V3(T, N) MMT_EMU_V4(T, N, (4 * S > 16 ? 16 : 4 * S))
MMT_EMU_VALL(signed char, char, 1)
MMT_EMU_VALL(unsigned char, uchar, 1)
MMT_EMU_VALL(short, short, 2)
MMT_EMU_VALL(unsigned short, ushort, 2)
MMT_EMU_VALL(int, int, 4)
MMT_EMU_VALL(unsigned int, uint, 4)
MMT_EMU_VALL(float, float, 4)
MMT_EMU_VALL(long long, longlong, 8)
MMT_EMU_VALL(unsigned long long, ulonglong, 8)
MMT_EMU_VALL(double, double, 8)
#undef MMT_EMU_VALL
#undef MMT_EMU_V1
#undef MMT_EMU_V2
#undef MMT_EMU_V3
#undef MMT_EMU_V4

// ---------------------------------------------------------------------------------------------
// cuda_fp16.h / cuda_bf16.h
// ---------------------------------------------------------------------------------------------
typedef ::mmt_emu::F16<0> __half;
typedef ::mmt_emu::F16<1> __nv_bfloat16;
typedef __half half;
typedef __nv_bfloat16 nv_bfloat16;
struct __attribute__((aligned(4))) __half2 {
  __half x, y;
};
struct __attribute__((aligned(4))) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
typedef __half2 half2;
typedef __nv_bfloat162 nv_bfloat162;
typedef unsigned short __half_raw_bits;

MMT_EMU_INLINE __half __float2half(float f) { return __half(f); }
MMT_EMU_INLINE __half __float2half_rn(float f) { return __half(f); }
MMT_EMU_INLINE float __half2float(__half h) { return float(h); }
MMT_EMU_INLINE __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
MMT_EMU_INLINE __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
MMT_EMU_INLINE float __bfloat162float(__nv_bfloat16 h) { return float(h); }
MMT_EMU_INLINE __half __int2half_rn(int i) { return __half(float(i)); }
MMT_EMU_INLINE __nv_bfloat16 __int2bfloat16_rn(int i) { return __nv_bfloat16(float(i)); }
MMT_EMU_INLINE unsigned short __half_as_ushort(__half h) { return h.bits; }
MMT_EMU_INLINE short __half_as_short(__half h) { return short(h.bits); }
MMT_EMU_INLINE __half __ushort_as_half(unsigned short u) { return __half::from_bits(u); }
MMT_EMU_INLINE __half __short_as_half(short u) { return __half::from_bits((unsigned short)u); }
MMT_EMU_INLINE unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }
MMT_EMU_INLINE short __bfloat16_as_short(__nv_bfloat16 h) { return short(h.bits); }
MMT_EMU_INLINE __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16::from_bits(u); }
MMT_EMU_INLINE __nv_bfloat16 __short_as_bfloat16(short u) { return __nv_bfloat16::from_bits((unsigned short)u); }

MMT_EMU_INLINE __half2 __halves2half2(__half a, __half b) { return {a, b}; }
MMT_EMU_INLINE __half2 __half2half2(__half a) { return {a, a}; }
MMT_EMU_INLINE __half2 __floats2half2_rn(float a, float b) { return {__half(a), __half(b)}; }
MMT_EMU_INLINE __half2 __float2half2_rn(float a) { return {__half(a), __half(a)}; }
MMT_EMU_INLINE __half2 __float22half2_rn(float2 v) { return {__half(v.x), __half(v.y)}; }
MMT_EMU_INLINE float2 __half22float2(__half2 v) { return {float(v.x), float(v.y)}; }
MMT_EMU_INLINE __half __low2half(__half2 v) { return v.x; }
MMT_EMU_INLINE __half __high2half(__half2 v) { return v.y; }
MMT_EMU_INLINE float __low2float(__half2 v) { return float(v.x); }
MMT_EMU_INLINE float __high2float(__half2 v) { return float(v.y); }
MMT_EMU_INLINE __half2 __lows2half2(__half2 a, __half2 b) { return {a.x, b.x}; }
MMT_EMU_INLINE __half2 __highs2half2(__half2 a, __half2 b) { return {a.y, b.y}; }
MMT_EMU_INLINE __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return {a, b}; }
MMT_EMU_INLINE __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 a) { return {a, a}; }
MMT_EMU_INLINE __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__nv_bfloat16(a), __nv_bfloat16(b)}; }
MMT_EMU_INLINE __nv_bfloat162 __float2bfloat162_rn(float a) { return {__nv_bfloat16(a), __nv_bfloat16(a)}; }
MMT_EMU_INLINE __nv_bfloat162 __float22bfloat162_rn(float2 v) { return {__nv_bfloat16(v.x), __nv_bfloat16(v.y)}; }
MMT_EMU_INLINE float2 __bfloat1622float2(__nv_bfloat162 v) { return {float(v.x), float(v.y)}; }
MMT_EMU_INLINE __nv_bfloat16 __low2bfloat16(__nv_bfloat162 v) { return v.x; }
MMT_EMU_INLINE __nv_bfloat16 __high2bfloat16(__nv_bfloat162 v) { return v.y; }
MMT_EMU_INLINE float __low2float(__nv_bfloat162 v) { return float(v.x); }
MMT_EMU_INLINE float __high2float(__nv_bfloat162 v) { return float(v.y); }
MMT_EMU_INLINE __nv_bfloat162 __lows2bfloat162(__nv_bfloat162 a, __nv_bfloat162 b) { return {a.x, b.x}; }
MMT_EMU_INLINE __nv_bfloat162 __highs2bfloat162(__nv_bfloat162 a, __nv_bfloat162 b) { return {a.y, b.y}; }

// scalar and paired arithmetic: computed exactly in float (products of 16-bit floats are exact),
// rounded once to the 16-bit type (fma: float fma then one rounding)
#define MMT_EMU_H16(T)                                                                               \
  MMT_EMU_INLINE T __hadd(T a, T b) { return T(float(a) + float(b)); }                               \
  MMT_EMU_INLINE T __hsub(T a, T b) { return T(float(a) - float(b)); }                               \
  MMT_EMU_INLINE T __hmul(T a, T b) { return T(float(a) * float(b)); }                               \
  MMT_EMU_INLINE T __hdiv(T a, T b) { return T(float(a) / float(b)); }                               \
  MMT_EMU_INLINE T __hfma(T a, T b, T c) { return T(std::fma(float(a), float(b), float(c))); }       \
  MMT_EMU_INLINE T __hneg(T a) { return -a; }                                                        \
  MMT_EMU_INLINE T __habs(T a) { return T::from_bits((unsigned short)(a.bits & 0x7fffu)); }          \
  MMT_EMU_INLINE T __hmax(T a, T b) { return float(a) < float(b) ? b : a; }                          \
  MMT_EMU_INLINE T __hmin(T a, T b) { return float(b) < float(a) ? b : a; }                          \
  MMT_EMU_INLINE bool __heq(T a, T b) { return float(a) == float(b); }                               \
  MMT_EMU_INLINE bool __hlt(T a, T b) { return float(a) < float(b); }                                \
  MMT_EMU_INLINE bool __hgt(T a, T b) { return float(a) > float(b); }                                \
  MMT_EMU_INLINE bool __hisnan(T a) { return std::isnan(float(a)); }
MMT_EMU_H16(__half)
MMT_EMU_H16(__nv_bfloat16)
#undef MMT_EMU_H16
#define MMT_EMU_H2(T2)                                                                               \
  MMT_EMU_INLINE T2 __hadd2(T2 a, T2 b) { return {__hadd(a.x, b.x), __hadd(a.y, b.y)}; }             \
  MMT_EMU_INLINE T2 __hsub2(T2 a, T2 b) { return {__hsub(a.x, b.x), __hsub(a.y, b.y)}; }             \
  MMT_EMU_INLINE T2 __hmul2(T2 a, T2 b) { return {__hmul(a.x, b.x), __hmul(a.y, b.y)}; }             \
  MMT_EMU_INLINE T2 __h2div(T2 a, T2 b) { return {__hdiv(a.x, b.x), __hdiv(a.y, b.y)}; }             \
  MMT_EMU_INLINE T2 __hfma2(T2 a, T2 b, T2 c) { return {__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)}; } \
  MMT_EMU_INLINE T2 __hneg2(T2 a) { return {-a.x, -a.y}; }                                           \
  MMT_EMU_INLINE T2 __habs2(T2 a) { return {__habs(a.x), __habs(a.y)}; }                             \
  MMT_EMU_INLINE T2 __hmax2(T2 a, T2 b) { return {__hmax(a.x, b.x), __hmax(a.y, b.y)}; }             \
  MMT_EMU_INLINE T2 __hmin2(T2 a, T2 b) { return {__hmin(a.x, b.x), __hmin(a.y, b.y)}; }             \
  MMT_EMU_INLINE T2 operator+(T2 a, T2 b) { return __hadd2(a, b); }                                  \
  MMT_EMU_INLINE T2 operator-(T2 a, T2 b) { return __hsub2(a, b); }                                  \
  MMT_EMU_INLINE T2 operator*(T2 a, T2 b) { return __hmul2(a, b); }
MMT_EMU_H2(__half2)
MMT_EMU_H2(__nv_bfloat162)
#undef MMT_EMU_H2

// ---------------------------------------------------------------------------------------------
// math and bit intrinsics
// ---------------------------------------------------------------------------------------------
template <class A, class B>
MMT_EMU_INLINE std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return C(b) < C(a) ? C(b) : C(a);
}
template <class A, class B>
MMT_EMU_INLINE std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return C(a) < C(b) ? C(b) : C(a);
}
using std::abs;
using std::ceil;
using std::exp;
using std::exp2;
using std::fabs;
using std::floor;
using std::fma;
using std::fmax;
using std::fmin;
using std::log;
using std::log2;
using std::pow;
using std::sqrt;
using std::tanh;
using std::cos;
using std::sin;
using std::round;
using std::trunc;
using std::isnan;
using std::isinf;
MMT_EMU_INLINE float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
MMT_EMU_INLINE double rsqrt(double x) { return 1.0 / std::sqrt(x); }
MMT_EMU_INLINE float __expf(float x) { return std::exp(x); }
MMT_EMU_INLINE float __exp10f(float x) { return std::pow(10.0f, x); }
MMT_EMU_INLINE float __logf(float x) { return std::log(x); }
MMT_EMU_INLINE float __log2f(float x) { return std::log2(x); }
MMT_EMU_INLINE float __powf(float a, float b) { return std::pow(a, b); }
MMT_EMU_INLINE float __sinf(float x) { return std::sin(x); }
MMT_EMU_INLINE float __cosf(float x) { return std::cos(x); }
MMT_EMU_INLINE float __tanhf(float x) { return std::tanh(x); }
MMT_EMU_INLINE float __fdividef(float a, float b) { return a / b; }
MMT_EMU_INLINE float __frcp_rn(float a) { return 1.0f / a; }
MMT_EMU_INLINE float __fsqrt_rn(float a) { return std::sqrt(a); }
MMT_EMU_INLINE float __saturatef(float x) { return x != x ? 0.0f : std::fmin(std::fmax(x, 0.0f), 1.0f); }
MMT_EMU_INLINE float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
MMT_EMU_INLINE float __fadd_rn(float a, float b) { return a + b; }
MMT_EMU_INLINE float __fmul_rn(float a, float b) { return a * b; }
MMT_EMU_INLINE float __int2float_rn(int i) { return float(i); }
MMT_EMU_INLINE float __uint2float_rn(unsigned i) { return float(i); }
MMT_EMU_INLINE int __float2int_rn(float f) { return int(std::nearbyint(f)); }
MMT_EMU_INLINE int __float2int_rz(float f) { return int(f); }
MMT_EMU_INLINE int __float2int_rd(float f) { return int(std::floor(f)); }
MMT_EMU_INLINE int __float2int_ru(float f) { return int(std::ceil(f)); }
MMT_EMU_INLINE unsigned __float2uint_rn(float f) { return unsigned(std::nearbyint(f)); }
MMT_EMU_INLINE unsigned __float2uint_rz(float f) { return unsigned(f); }
MMT_EMU_INLINE unsigned __float_as_uint(float f) { return __builtin_bit_cast(unsigned, f); }
MMT_EMU_INLINE int __float_as_int(float f) { return __builtin_bit_cast(int, f); }
MMT_EMU_INLINE float __uint_as_float(unsigned u) { return __builtin_bit_cast(float, u); }
MMT_EMU_INLINE float __int_as_float(int u) { return __builtin_bit_cast(float, u); }
MMT_EMU_INLINE long long __double_as_longlong(double d) { return __builtin_bit_cast(long long, d); }
MMT_EMU_INLINE double __longlong_as_double(long long d) { return __builtin_bit_cast(double, d); }
MMT_EMU_INLINE int __popc(unsigned x) { return __builtin_popcount(x); }
MMT_EMU_INLINE int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
MMT_EMU_INLINE int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
MMT_EMU_INLINE int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
MMT_EMU_INLINE int __ffs(int x) { return __builtin_ffs(x); }
MMT_EMU_INLINE int __ffsll(long long x) { return __builtin_ffsll(x); }
MMT_EMU_INLINE unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; i++) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
MMT_EMU_INLINE unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const unsigned long long v = (unsigned long long)y << 32 | x;
  unsigned r = 0;
  for (int i = 0; i < 4; i++) r |= unsigned((v >> (((s >> (4 * i)) & 7u) * 8)) & 0xffu) << (8 * i);
  return r;
}
MMT_EMU_INLINE unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned s) {
  const unsigned long long v = (unsigned long long)hi << 32 | lo;
  return unsigned((v << (s & 31u)) >> 32);
}
MMT_EMU_INLINE unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned s) {
  const unsigned long long v = (unsigned long long)hi << 32 | lo;
  return unsigned(v >> (s & 31u));
}
MMT_EMU_INLINE unsigned __umulhi(unsigned a, unsigned b) { return unsigned(((unsigned long long)a * b) >> 32); }
MMT_EMU_INLINE int __mulhi(int a, int b) { return int(((long long)a * b) >> 32); }
MMT_EMU_INLINE int __mul24(int a, int b) { return int(((long long)(a << 8 >> 8) * (b << 8 >> 8))); }
template <class T>
MMT_EMU_INLINE T __ldg(const T* p) { return *p; }
template <class T>
MMT_EMU_INLINE T __ldcg(const T* p) { return *p; }
template <class T>
MMT_EMU_INLINE T __ldca(const T* p) { return *p; }
template <class T>
MMT_EMU_INLINE T __ldcs(const T* p) { return *p; }
template <class T>
MMT_EMU_INLINE T __ldlu(const T* p) { return *p; }
template <class T>
MMT_EMU_INLINE T __ldcv(const T* p) { return *p; }
template <class T>
MMT_EMU_INLINE void __stcs(T* p, T v) { *p = v; }
template <class T>
MMT_EMU_INLINE void __stcg(T* p, T v) { *p = v; }
template <class T>
MMT_EMU_INLINE void __stwb(T* p, T v) { *p = v; }
MMT_EMU_INLINE void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
MMT_EMU_INLINE void __threadfence_block() {}
template <class T>
MMT_EMU_INLINE unsigned __cvta_generic_to_shared(const T* p) {
  return unsigned(reinterpret_cast<const char*>(p) - ::mmt_emu::cur_fiber()->g->arena);
}
MMT_EMU_INLINE void __trap() { ::mmt_emu::fail_in(::mmt_emu::cur_fiber(), "__trap() called"); }
#define assert(x) ((x) ? (void)0 : ::mmt_emu::fail_in(::mmt_emu::cur_fiber(), "assertion failed: %s", #x))

// ---------------------------------------------------------------------------------------------
// synchronization and warp functions
// ---------------------------------------------------------------------------------------------
MMT_EMU_INLINE void mmt_syncthreads_at(int line) { ::mmt_emu::barrier("__syncthreads", line); }
#define __syncthreads() mmt_syncthreads_at(__LINE__)
MMT_EMU_INLINE void __syncwarp(unsigned mask = 0xffffffffu) { ::mmt_emu::coll_sync(mask, "__syncwarp"); }
MMT_EMU_INLINE unsigned __activemask() { return ::mmt_emu::coll_active(0, "__activemask"); }
MMT_EMU_INLINE unsigned __lanemask_lt() { return (1u << ::mmt_emu::cur_fiber()->lane) - 1u; }

template <class T>
MMT_EMU_INLINE T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return ::mmt_emu::coll_shuffle<T, 0>(v, src, width, mask, "__shfl_sync");
}
template <class T>
MMT_EMU_INLINE T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::mmt_emu::coll_shuffle<T, 1>(v, int(delta), width, mask, "__shfl_down_sync");
}
template <class T>
MMT_EMU_INLINE T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::mmt_emu::coll_shuffle<T, 2>(v, int(delta), width, mask, "__shfl_up_sync");
}
template <class T>
MMT_EMU_INLINE T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::mmt_emu::coll_shuffle<T, 3>(v, lane_mask, width, mask, "__shfl_xor_sync");
}
MMT_EMU_INLINE unsigned __ballot_sync(unsigned mask, int pred) { return ::mmt_emu::coll_ballot(pred != 0, mask, "__ballot_sync") & mask; }
MMT_EMU_INLINE int __any_sync(unsigned mask, int pred) { return (::mmt_emu::coll_ballot(pred != 0, mask, "__any_sync") & mask) != 0; }
MMT_EMU_INLINE int __all_sync(unsigned mask, int pred) { return (::mmt_emu::coll_ballot(pred != 0, mask, "__all_sync") & mask) == mask; }
MMT_EMU_INLINE unsigned __reduce_add_sync(unsigned mask, unsigned v) { return ::mmt_emu::coll_reduce<unsigned, ::mmt_emu::R_SUM>(v, mask, "__reduce_add_sync"); }
MMT_EMU_INLINE int __reduce_add_sync(unsigned mask, int v) { return ::mmt_emu::coll_reduce<int, ::mmt_emu::R_SUM>(v, mask, "__reduce_add_sync"); }
MMT_EMU_INLINE unsigned __reduce_min_sync(unsigned mask, unsigned v) { return ::mmt_emu::coll_reduce<unsigned, ::mmt_emu::R_MIN>(v, mask, "__reduce_min_sync"); }
MMT_EMU_INLINE int __reduce_min_sync(unsigned mask, int v) { return ::mmt_emu::coll_reduce<int, ::mmt_emu::R_MIN>(v, mask, "__reduce_min_sync"); }
MMT_EMU_INLINE unsigned __reduce_max_sync(unsigned mask, unsigned v) { return ::mmt_emu::coll_reduce<unsigned, ::mmt_emu::R_MAX>(v, mask, "__reduce_max_sync"); }
MMT_EMU_INLINE int __reduce_max_sync(unsigned mask, int v) { return ::mmt_emu::coll_reduce<int, ::mmt_emu::R_MAX>(v, mask, "__reduce_max_sync"); }
MMT_EMU_INLINE unsigned __reduce_and_sync(unsigned mask, unsigned v) { return ::mmt_emu::coll_reduce<unsigned, ::mmt_emu::R_AND>(v, mask, "__reduce_and_sync"); }
MMT_EMU_INLINE unsigned __reduce_or_sync(unsigned mask, unsigned v) { return ::mmt_emu::coll_reduce<unsigned, ::mmt_emu::R_OR>(v, mask, "__reduce_or_sync"); }
MMT_EMU_INLINE unsigned __reduce_xor_sync(unsigned mask, unsigned v) { return ::mmt_emu::coll_reduce<unsigned, ::mmt_emu::R_XOR>(v, mask, "__reduce_xor_sync"); }

// ---------------------------------------------------------------------------------------------
// atomics
// ---------------------------------------------------------------------------------------------
template <class T, class U>
MMT_EMU_INLINE T atomicAdd(T* p, U v) { return ::mmt_emu::atomic_fetch_op<T>(p, T(v), 0); }
template <class T, class U>
MMT_EMU_INLINE T atomicSub(T* p, U v) { return ::mmt_emu::atomic_fetch_op<T>(p, T(v), 1); }
template <class T, class U>
MMT_EMU_INLINE T atomicAnd(T* p, U v) { return ::mmt_emu::atomic_fetch_op<T>(p, T(v), 2); }
template <class T, class U>
MMT_EMU_INLINE T atomicOr(T* p, U v) { return ::mmt_emu::atomic_fetch_op<T>(p, T(v), 3); }
template <class T, class U>
MMT_EMU_INLINE T atomicXor(T* p, U v) { return ::mmt_emu::atomic_fetch_op<T>(p, T(v), 4); }
template <class T, class U>
MMT_EMU_INLINE T atomicMin(T* p, U v) { return ::mmt_emu::atomic_fetch_op<T>(p, T(v), 5); }
template <class T, class U>
MMT_EMU_INLINE T atomicMax(T* p, U v) { return ::mmt_emu::atomic_fetch_op<T>(p, T(v), 6); }
template <class T, class U>
MMT_EMU_INLINE T atomicExch(T* p, U v) { return ::mmt_emu::atomic_fetch_op<T>(p, T(v), 7); }
template <class T>
MMT_EMU_INLINE T atomicCAS(T* p, T cmp, T v) {
  T e = cmp;
  ::mmt_emu::atomic_cas<T>(p, &e, v);
  return e;
}
MMT_EMU_INLINE __half2 atomicAdd(__half2* p, __half2 v) {
  __half2 o;
  o.x = ::mmt_emu::atomic_fetch_op<__half>(&p->x, v.x, 0);
  o.y = ::mmt_emu::atomic_fetch_op<__half>(&p->y, v.y, 0);
  return o;
}
MMT_EMU_INLINE __nv_bfloat162 atomicAdd(__nv_bfloat162* p, __nv_bfloat162 v) {
  __nv_bfloat162 o;
  o.x = ::mmt_emu::atomic_fetch_op<__nv_bfloat16>(&p->x, v.x, 0);
  o.y = ::mmt_emu::atomic_fetch_op<__nv_bfloat16>(&p->y, v.y, 0);
  return o;
}

// ---------------------------------------------------------------------------------------------
// cooperative groups (basics)
// ---------------------------------------------------------------------------------------------
namespace cooperative_groups {
struct thread_block {
  MMT_EMU_INLINE void sync() const { ::mmt_emu::barrier("cg::thread_block::sync"); }
  MMT_EMU_INLINE unsigned thread_rank() const { return ::mmt_emu::cur_fiber()->linear; }
  MMT_EMU_INLINE unsigned size() const { return unsigned(::mmt_emu::cur_fiber()->g->n); }
  MMT_EMU_INLINE unsigned num_threads() const { return size(); }
  MMT_EMU_INLINE dim3 group_index() const { return ::mmt_emu::cuda_block_idx(); }
  MMT_EMU_INLINE dim3 thread_index() const { return ::mmt_emu::cuda_thread_idx(); }
  MMT_EMU_INLINE dim3 group_dim() const { return ::mmt_emu::cuda_block_dim(); }
  MMT_EMU_INLINE dim3 dim_threads() const { return ::mmt_emu::cuda_block_dim(); }
};
MMT_EMU_INLINE thread_block this_thread_block() { return {}; }
MMT_EMU_INLINE void sync(const thread_block& b) { b.sync(); }

template <unsigned N>
struct thread_block_tile {
  static_assert(N == 1 || N == 2 || N == 4 || N == 8 || N == 16 || N == 32, "tile size must divide 32");
  MMT_EMU_INLINE unsigned mask() const {
    const unsigned lane = ::mmt_emu::cur_fiber()->lane;
    return N == 32 ? 0xffffffffu : (((1u << N) - 1u) << (lane / N * N));
  }
  MMT_EMU_INLINE void sync() const { ::mmt_emu::coll_sync(mask(), "thread_block_tile::sync"); }
  MMT_EMU_INLINE unsigned thread_rank() const { return ::mmt_emu::cur_fiber()->lane % N; }
  MMT_EMU_INLINE unsigned meta_group_rank() const { return ::mmt_emu::cur_fiber()->linear / N; }
  MMT_EMU_INLINE unsigned meta_group_size() const { return (unsigned(::mmt_emu::cur_fiber()->g->n) + N - 1) / N; }
  static constexpr unsigned size() { return N; }
  static constexpr unsigned num_threads() { return N; }
  template <class T>
  MMT_EMU_INLINE T shfl(T v, int src) const { return ::mmt_emu::coll_shuffle<T, 0>(v, src, N, mask(), "tile.shfl"); }
  template <class T>
  MMT_EMU_INLINE T shfl_down(T v, unsigned d) const { return ::mmt_emu::coll_shuffle<T, 1>(v, int(d), N, mask(), "tile.shfl_down"); }
  template <class T>
  MMT_EMU_INLINE T shfl_up(T v, unsigned d) const { return ::mmt_emu::coll_shuffle<T, 2>(v, int(d), N, mask(), "tile.shfl_up"); }
  template <class T>
  MMT_EMU_INLINE T shfl_xor(T v, unsigned m) const { return ::mmt_emu::coll_shuffle<T, 3>(v, int(m), N, mask(), "tile.shfl_xor"); }
  MMT_EMU_INLINE unsigned ballot(int p) const {
    const unsigned lane = ::mmt_emu::cur_fiber()->lane;
    return (::mmt_emu::coll_ballot(p != 0, mask(), "tile.ballot") & mask()) >> (N == 32 ? 0 : lane / N * N);
  }
  MMT_EMU_INLINE bool any(int p) const { return (::mmt_emu::coll_ballot(p != 0, mask(), "tile.any") & mask()) != 0; }
  MMT_EMU_INLINE bool all(int p) const { return (::mmt_emu::coll_ballot(p != 0, mask(), "tile.all") & mask()) == mask(); }
};
template <unsigned N, class P>
MMT_EMU_INLINE thread_block_tile<N> tiled_partition(const P&) { return {}; }

template <class T>
struct plus {
  MMT_EMU_INLINE T operator()(T a, T b) const { return a + b; }
};
template <class T>
struct less {
  MMT_EMU_INLINE T operator()(T a, T b) const { return b < a ? b : a; }
};
template <class T>
struct greater {
  MMT_EMU_INLINE T operator()(T a, T b) const { return a < b ? b : a; }
};
// butterfly reduction over the tile (the order CUDA's cg::reduce uses for shuffles)
template <unsigned N, class T, class Op>
MMT_EMU_INLINE T reduce(const thread_block_tile<N>& t, T v, Op op) {
  for (unsigned o = N / 2; o > 0; o /= 2) v = op(v, t.shfl_xor(v, o));
  return v;
}
}  // namespace cooperative_groups

// ---------------------------------------------------------------------------------------------
// the part of mlx/backend/cuda/device/utils.cuh that custom kernels use
// ---------------------------------------------------------------------------------------------
namespace mlx::core::cu {
constexpr int MAX_NDIM = 10;
template <class T, int N>
struct EmuArray {
  T v_[N];
  MMT_EMU_INLINE T& operator[](int i) { return v_[i]; }
  MMT_EMU_INLINE const T& operator[](int i) const { return v_[i]; }
  MMT_EMU_INLINE T* data() { return v_; }
  MMT_EMU_INLINE const T* data() const { return v_; }
  static constexpr int size() { return N; }
  static MMT_EMU_INLINE EmuArray load(const T* p) {
    EmuArray a;
    for (int i = 0; i < N; i++) a.v_[i] = p[i];
    return a;
  }
};
using Shape = EmuArray<int32_t, MAX_NDIM>;
using Strides = EmuArray<int64_t, MAX_NDIM>;

template <typename IdxT = int64_t>
MMT_EMU_INLINE IdxT elem_to_loc(IdxT elem, const int* shape, const int64_t* strides, int ndim) {
  IdxT loc = 0;
  for (int i = ndim - 1; i >= 0; --i) {
    loc += (elem % shape[i]) * IdxT(strides[i]);
    elem /= shape[i];
  }
  return loc;
}
template <typename T>
MMT_EMU_INLINE constexpr T ceil_div(T a, T b) { return (a + b - 1) / b; }
}  // namespace mlx::core::cu

// ---------------------------------------------------------------------------------------------
// mmt:: intrinsics (cuda/mmt_intrinsics.cuh) with PTX ISA semantics
// ---------------------------------------------------------------------------------------------
namespace mmt {
using ::mmt_emu::Fiber;
using ::mmt_emu::Group;

MMT_EMU_INLINE unsigned smem_addr(const void* p) {
  return unsigned(static_cast<const char*>(p) - ::mmt_emu::cur_fiber()->g->arena);
}

template <uint32_t B, uint32_t C>
MMT_EMU_INLINE uint32_t and_or(uint32_t a) { return (a & B) | C; }

template <int K>
struct MmaArgs {
  float* d;
  const uint32_t* a;
  const uint32_t* b;
  const float* c;
};

template <int K>  // 0: f16, 1: bf16
MMT_EMU_RT void resolve_mma16816(Fiber** lanes, Group*) {
  float A[16][16], B[16][8], C[16][8];
  auto lo = [](uint32_t w) { return float(::mmt_emu::F16<K>::from_bits(uint16_t(w & 0xffffu))); };
  auto hi = [](uint32_t w) { return float(::mmt_emu::F16<K>::from_bits(uint16_t(w >> 16))); };
  for (int l = 0; l < 32; l++) {
    const MmaArgs<K>* p = static_cast<MmaArgs<K>*>(lanes[l]->coll.args);
    const int g = l / 4, t = l % 4;
    A[g][2 * t] = lo(p->a[0]);     A[g][2 * t + 1] = hi(p->a[0]);
    A[g + 8][2 * t] = lo(p->a[1]); A[g + 8][2 * t + 1] = hi(p->a[1]);
    A[g][2 * t + 8] = lo(p->a[2]); A[g][2 * t + 9] = hi(p->a[2]);
    A[g + 8][2 * t + 8] = lo(p->a[3]); A[g + 8][2 * t + 9] = hi(p->a[3]);
    B[2 * t][g] = lo(p->b[0]);     B[2 * t + 1][g] = hi(p->b[0]);
    B[2 * t + 8][g] = lo(p->b[1]); B[2 * t + 9][g] = hi(p->b[1]);
    C[g][2 * t] = p->c[0];         C[g][2 * t + 1] = p->c[1];
    C[g + 8][2 * t] = p->c[2];     C[g + 8][2 * t + 1] = p->c[3];
  }
  for (int l = 0; l < 32; l++) {
    MmaArgs<K>* p = static_cast<MmaArgs<K>*>(lanes[l]->coll.args);
    const int g = l / 4, t = l % 4;
    for (int i = 0; i < 4; i++) {
      const int r = g + (i >= 2 ? 8 : 0), c = 2 * t + (i & 1);
      float acc = C[r][c];
      for (int k = 0; k < 16; k++) acc = std::fma(A[r][k], B[k][c], acc);
      p->d[i] = acc;
    }
  }
}

template <int K>
MMT_EMU_RT void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4], const void* site) {
  uint32_t ca[4] = {a[0], a[1], a[2], a[3]};
  uint32_t cb[2] = {b[0], b[1]};
  float cc[4] = {c[0], c[1], c[2], c[3]};
  float out[4];
  MmaArgs<K> args{out, ca, cb, cc};
  ::mmt_emu::collective(&resolve_mma16816<K>, &args, 0xffffffffu, site, K ? "mma.sync.m16n8k16.bf16" : "mma.sync.m16n8k16.f16");
  for (int i = 0; i < 4; i++) d[i] = out[i];
}
MMT_EMU_RT inline void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  mma16816<1>(d, a, b, c, MMT_EMU_SITE);
}
MMT_EMU_RT inline void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  mma16816<0>(d, a, b, c, MMT_EMU_SITE);
}

// ldmatrix: lanes 8i..8i+7 give the row addresses of matrix i (16 bytes each, shared memory)
struct LdmArgs {
  const void* row;
  uint32_t* r;
  int n;
  bool trans;
};
MMT_EMU_RT inline void resolve_ldmatrix(Fiber** lanes, Group* g) {
  const LdmArgs* a0 = static_cast<LdmArgs*>(lanes[0]->coll.args);
  const int n = a0->n;
  uint16_t M[4][8][8];
  for (int i = 0; i < n; i++)
    for (int r = 0; r < 8; r++) {
      Fiber* src = lanes[8 * i + r];
      const LdmArgs* a = static_cast<LdmArgs*>(src->coll.args);
      const char* p = static_cast<const char*>(a->row);
      if (p < g->arena || p + 16 > g->arena + g->arena_cap)
        ::mmt_emu::fail_in(src, "ldmatrix: row address %p of lane %d is not in shared memory", (const void*)p, 8 * i + r);
      if ((reinterpret_cast<uintptr_t>(p) - reinterpret_cast<uintptr_t>(g->arena)) % 16 != 0)
        ::mmt_emu::fail_in(src, "ldmatrix: row address of lane %d is not 16-byte aligned", 8 * i + r);
      ::mmt_emu::note_access_as(src, p, 16, false);
      memcpy(M[i][r], p, 16);
    }
  for (int l = 0; l < 32; l++) {
    LdmArgs* a = static_cast<LdmArgs*>(lanes[l]->coll.args);
    if (a->n != n || a->trans != a0->trans)
      ::mmt_emu::fail_in(lanes[l], "ldmatrix: lanes of one warp use different shapes");
    const int row = l / 4, col = 2 * (l % 4);
    for (int i = 0; i < n; i++) {
      uint16_t e0, e1;
      if (a->trans) {
        e0 = M[i][col][row];
        e1 = M[i][col + 1][row];
      } else {
        e0 = M[i][row][col];
        e1 = M[i][row][col + 1];
      }
      a->r[i] = uint32_t(e0) | (uint32_t(e1) << 16);
    }
  }
}
MMT_EMU_RT inline void ldmatrix_n(uint32_t* r, const void* row, int n, bool trans, const void* site) {
  LdmArgs a{row, r, n, trans};
  ::mmt_emu::collective(&resolve_ldmatrix, &a, 0xffffffffu, site, "ldmatrix.sync");
}
MMT_EMU_RT inline void ldmatrix_x1(uint32_t (&r)[1], const void* row) { ldmatrix_n(r, row, 1, false, MMT_EMU_SITE); }
MMT_EMU_RT inline void ldmatrix_x2(uint32_t (&r)[2], const void* row) { ldmatrix_n(r, row, 2, false, MMT_EMU_SITE); }
MMT_EMU_RT inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) { ldmatrix_n(r, row, 4, false, MMT_EMU_SITE); }
MMT_EMU_RT inline void ldmatrix_x1_trans(uint32_t (&r)[1], const void* row) { ldmatrix_n(r, row, 1, true, MMT_EMU_SITE); }
MMT_EMU_RT inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) { ldmatrix_n(r, row, 2, true, MMT_EMU_SITE); }
MMT_EMU_RT inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) { ldmatrix_n(r, row, 4, true, MMT_EMU_SITE); }

// cp.async: recorded at issue (source bounds checked then), performed when a wait retires its
// group, so a missing wait leaves stale shared memory exactly where the GPU could.
MMT_EMU_RT inline void cp_async_issue(void* smem, const void* gmem, uint32_t bytes) {
  Fiber* f = ::mmt_emu::cur_fiber();
  Group* g = f->g;
  const char* s = static_cast<const char*>(smem);
  if (s < g->arena || s + 16 > g->arena + g->arena_cap)
    ::mmt_emu::fail_in(f, "cp.async: destination %p is not in shared memory", smem);
  if ((reinterpret_cast<uintptr_t>(smem) | reinterpret_cast<uintptr_t>(gmem)) % 16 != 0 && bytes > 0)
    ::mmt_emu::fail_in(f, "cp.async: 16-byte copy with a misaligned address (smem %p, gmem %p)", smem, gmem);
  if (bytes) ::mmt_emu::note_access_as(f, gmem, bytes, false);
  if (f->ncp == ::mmt_emu::kMaxAsync) ::mmt_emu::fail_in(f, "cp.async: more than %d copies in flight", ::mmt_emu::kMaxAsync);
  f->cp[f->ncp++] = ::mmt_emu::AsyncCopy{smem, gmem, bytes, 16u, f->cp_next_group};
}
MMT_EMU_RT inline void cp_async_16(void* smem, const void* gmem) { cp_async_issue(smem, gmem, 16); }
MMT_EMU_RT inline void cp_async_16_zfill(void* smem, const void* gmem, bool pred) { cp_async_issue(smem, gmem, pred ? 16 : 0); }
// prefetch.global.L2: no effect on results; with check on, the word it names must lie inside a
// buffer (the kernels prefetch only the first word of a chunk they will load).
MMT_EMU_RT inline void prefetch_l2(const void* p) { ::mmt_emu::note_access_as(::mmt_emu::cur_fiber(), p, 4, false); }
MMT_EMU_RT inline void cp_async_commit() { ::mmt_emu::cur_fiber()->cp_next_group++; }
MMT_EMU_RT inline void cp_async_wait_n(int n) {
  Fiber* f = ::mmt_emu::cur_fiber();
  // committed groups are < cp_next_group; keep the newest n of them in flight
  const int64_t limit = int64_t(f->cp_next_group) - n;
  int keep = 0;
  for (int i = 0; i < f->ncp; i++) {
    ::mmt_emu::AsyncCopy& c = f->cp[i];
    if (int64_t(c.group) < limit) {
      ::mmt_emu::note_access_as(f, c.dst, c.size, true);
      if (c.bytes) memcpy(c.dst, c.src, c.bytes);
      if (c.size > c.bytes) memset(static_cast<char*>(c.dst) + c.bytes, 0, c.size - c.bytes);
    } else {
      f->cp[keep++] = c;
    }
  }
  f->ncp = keep;
}
template <int N>
MMT_EMU_INLINE void cp_async_wait() {
  static_assert(N >= 0, "cp.async.wait_group N must be >= 0");
  cp_async_wait_n(N);
}
MMT_EMU_INLINE void cp_async_wait_all() {
  cp_async_commit();
  cp_async_wait_n(0);
}
}  // namespace mmt
