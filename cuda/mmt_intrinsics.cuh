// mlx-moe-tune CUDA intrinsics: the few PTX instructions our kernels use, behind one API.
//
// On the GPU (NVRTC via mx.fast.cuda_kernel) each function is inline PTX. Under the CPU SIMT
// emulator (MMT_EMULATOR defined) the same names are provided by the emulator runtime with
// the PTX ISA fragment layouts, so one kernel source runs on both targets.
//
// Fragment conventions (PTX ISA, mma.m16n8k16 with .bf16/.f16 inputs, .f32 accumulators):
//   lane = threadIdx.x % 32, group = lane / 4, tig = lane % 4
//   A (16x16, row-major) a[0..3]: each uint32 packs 2 consecutive-k halves;
//     a0: (row group,   k tig*2..+1)   a1: (row group+8, k tig*2..+1)
//     a2: (row group,   k tig*2+8..+9) a3: (row group+8, k tig*2+8..+9)
//   B (16x8, "col-major": indexed [k][n]) b[0..1]:
//     b0: (k tig*2..+1, n group)        b1: (k tig*2+8..+9, n group)
//   C/D (16x8 f32) c[0..3]: c0,c1: (row group, n tig*2..+1)  c2,c3: (row group+8, n tig*2..+1)
// ldmatrix .x1/.x2/.x4 (.b16, 8x8 matrices): lanes 8i..8i+7 give the row addresses of matrix i;
//   lane l receives, for matrix i, register r[i] = elements (row l/4, cols 2*(l%4), +1).
//   .trans delivers the transposed matrix in the same register layout.
// cp.async: 16-byte global->shared copies, grouped by commit; wait<N> leaves at most N
//   groups of this thread in flight. zfill variant writes zeros when pred is false.
#pragma once

#ifndef MMT_EMULATOR
#ifndef __CUDACC_RTC__  // NVRTC has no <cstdint>; MLX's prepended utils.cuh defines the types
#include <cstdint>
#endif
namespace mmt {

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4],
                                                  const uint32_t (&b)[2], const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
        "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4],
                                                 const uint32_t (&b)[2], const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
        "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
               : "=r"(r[0]) : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row)));
}

// (a & B) | C as one LOP3. Written as C++ with two immediates, the compiler emits two LOP3s
// (SASS takes one immediate per instruction); this is the dequantization's inner operation,
// one per weight pair (H100 qmv profile: the ALU pipe was the busiest, 69% active).
template <uint32_t B, uint32_t C>
__device__ __forceinline__ uint32_t and_or(uint32_t a) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "n"(B), "n"(C));
  return d;
}

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem));
}
// Copies 16 bytes when pred, else fills the 16 shared bytes with zeros (src-size 0).
__device__ __forceinline__ void cp_async_16_zfill(void* smem, const void* gmem, bool pred) {
  int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)),
               "l"(gmem), "r"(n));
}
// Hint: bring the line holding p into L2 (no register, no completion to wait for). The W stream
// of a later k block, issued ahead of its register load (warp_gemm's PF), so that load waits on
// L2 instead of DRAM.
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

}  // namespace mmt
#endif  // MMT_EMULATOR
