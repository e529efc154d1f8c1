// mlx-moe-tune: CUDA gather_qmm kernel families (qmv, qmm, qmm_glu), shared core.
//
// Prepended as `header` (after cuda/mmt_intrinsics.cuh) to the bodies cuda/qmv.cu, cuda/qmm.cu,
// cuda/qmm_glu.cu for mx.fast.cuda_kernel; the kernel I/O contract is in TEAM.md.
//
// "Swap AB": every warp computes a (16*FN output features) x (8*CG activation rows) tile with
// mma.sync m16n8k16 where the *weights* are the A operand (16 rows of W x 16 k) and the
// activations are B (16 k x 8 rows). At small m only the n=8 side is wasted, not the m=16 one.
//
// k permutation: a dot product does not change when the same permutation of k is applied to W
// and x, so a lane does not load the k values the PTX fragment layout names. Lane (g = lane/4,
// tig = lane%4) owns, per k block of 4*VPL values, the VPL consecutive values
// [(4*kb + tig)*VPL, +VPL) of W rows g and g+8: one 128-bit load per row (fully used 32-byte
// sectors, no shared memory, no ldmatrix), all inside one quantization group (VPL <= GS), so
// one scale and bias per row. Packed word j of that chunk yields the pairs
// (q_i, q_{i+VPW/2}), i < VPW/2 (one mask picks both: the magic-number conversion below), and
// x is loaded with the same permutation (VPW contiguous values, recombined with byte permutes).
// The shared-memory x path (4-bit, BM >= 16) keeps x in natural order instead and permutes W
// (dequant_word_nat4): there a warp reads CG x words per W word, so the permute belongs on W.
//
// Dequantization of a pair (4-bit, bf16): ((w >> 4i) & 0x000F000F) | 0x43004300 is the bf16 pair
// (128 + q_i, 128 + q_{i+4}); subtract 128 (exact), then one bf16x2 fma with (scale, bias):
// about 2 integer/fp ops per weight. fp16 uses 1024 (10 mantissa bits: 8-bit fits too); 8-bit
// with bf16 goes through float (bf16 has 7 mantissa bits).
#pragma once

namespace mmt {

constexpr unsigned kFullMask = 0xffffffffu;

// ---- element-type traits: packed pair arithmetic and the mma for T ---------------------------
template <typename T>
struct Pair;

template <>
struct Pair<__nv_bfloat16> {
  using P2 = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;  // (128.0, 128.0)
  static constexpr int kMantissa = 7;
  __device__ static uint32_t fma(uint32_t a, uint32_t b, uint32_t c) {
    P2 r = __hfma2(*reinterpret_cast<const P2*>(&a), *reinterpret_cast<const P2*>(&b),
                   *reinterpret_cast<const P2*>(&c));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
  __device__ static uint32_t sub(uint32_t a, uint32_t b) {
    P2 r = __hsub2(*reinterpret_cast<const P2*>(&a), *reinterpret_cast<const P2*>(&b));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
  __device__ static uint32_t pack(float lo, float hi) {
    P2 r = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&r);
  }
  __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16(v); }
  __device__ static void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    mma_m16n8k16_bf16(d, a, b, d);
  }
};

template <>
struct Pair<__half> {
  using P2 = __half2;
  static constexpr uint32_t kMagic = 0x64006400u;  // (1024.0, 1024.0)
  static constexpr int kMantissa = 10;
  __device__ static uint32_t fma(uint32_t a, uint32_t b, uint32_t c) {
    P2 r = __hfma2(*reinterpret_cast<const P2*>(&a), *reinterpret_cast<const P2*>(&b),
                   *reinterpret_cast<const P2*>(&c));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
  __device__ static uint32_t sub(uint32_t a, uint32_t b) {
    P2 r = __hsub2(*reinterpret_cast<const P2*>(&a), *reinterpret_cast<const P2*>(&b));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
  __device__ static uint32_t pack(float lo, float hi) {
    P2 r = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&r);
  }
  __device__ static float to_float(__half v) { return __half2float(v); }
  __device__ static __half from_float(float v) { return __float2half(v); }
  __device__ static void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    mma_m16n8k16_f16(d, a, b, d);
  }
};

// ---- quantization geometry -------------------------------------------------------------------
template <int BITS, int GS, int K>
struct QGeom {
  static constexpr int VPW = 32 / BITS;  // values per packed word
  static constexpr int CW = (GS * BITS / 32) < 4 ? (GS * BITS / 32) : 4;  // words per lane chunk
  static constexpr int VPL = CW * VPW;   // k values per lane chunk (divides GS, hence K)
  static constexpr int KB = 4 * VPL;     // k values per warp step (the 4 lanes of a row)
  static constexpr int NKB = (K + KB - 1) / KB;
  static constexpr int KW = K / VPW;     // words per weight row
  static constexpr int KG = K / GS;      // groups per weight row
  static constexpr int PPW = VPW / 2;    // bf16/f16 pairs per word; PPW/2 mma k-steps per word
  static_assert(BITS == 2 || BITS == 4 || BITS == 8, "bits must be 2, 4 or 8");
  static_assert(GS % VPL == 0 && K % GS == 0, "lane chunks must not straddle groups");
};

template <int NW>
__device__ inline void load_words(const uint32_t* p, uint32_t (&r)[NW]) {
  static_assert(NW == 2 || NW == 4 || NW == 8, "vector load of 2, 4 or 8 words");
  if constexpr (NW == 2) {
    uint2 v = *reinterpret_cast<const uint2*>(p);
    r[0] = v.x; r[1] = v.y;
  } else {
#pragma unroll
    for (int i = 0; i < NW; i += 4) {
      uint4 v = *reinterpret_cast<const uint4*>(p + i);
      r[i] = v.x; r[i + 1] = v.y; r[i + 2] = v.z; r[i + 3] = v.w;
    }
  }
}

template <typename T>
__device__ inline uint32_t splat(T v) {
  const uint32_t h = *reinterpret_cast<const uint16_t*>(&v);
  return h | (h << 16);
}

// Pairs (q_i, q_{i+VPW/2}) of one packed word, dequantized to T: out[i], i < VPW/2.
template <typename T, int BITS>
__device__ inline void dequant_word(uint32_t wq, uint32_t s2, uint32_t b2, float sf, float bf,
                                    uint32_t (&out)[16 / BITS]) {
  using Tr = Pair<T>;
  constexpr int NP = 16 / BITS;
  constexpr uint32_t MASK = ((1u << BITS) - 1u) * 0x00010001u;
  if constexpr (BITS <= Tr::kMantissa) {
#pragma unroll
    for (int i = 0; i < NP; i++) {
      const uint32_t u = and_or<MASK, Tr::kMagic>(wq >> (BITS * i));
      out[i] = Tr::fma(Tr::sub(u, Tr::kMagic), s2, b2);
    }
  } else {  // 8-bit with bf16: float magic 2^23 + q, fma in float, round once to T
#pragma unroll
    for (int i = 0; i < NP; i++) {
      const uint32_t u = (wq >> (BITS * i)) & MASK;
      const float lo = __uint_as_float((u & 0xffffu) | 0x4b000000u) - 8388608.0f;
      const float hi = __uint_as_float((u >> 16) | 0x4b000000u) - 8388608.0f;
      out[i] = Tr::pack(fmaf(lo, sf, bf), fmaf(hi, sf, bf));
    }
  }
}

// Natural-order pairs (q_{2i}, q_{2i+1}) of a 4-bit word, for the shared-memory x path: x pairs
// are then the tile's consecutive values as loaded. Per k step j a warp saves 4 PRMT per x
// granule (CG of them) and pays 2 integer ops more per W word (2 FN of them: 1 SHF + 4 PRMT
// instead of 3 SHF), so it wins where CG > FN (measured: BM32 and BM64; BM16 FN2 even).
// PRMT puts byte i of wq (q_{2i} in its low nibble) in byte 0 and byte i of wq >> 4 (q_{2i+1})
// in byte 2; the mask keeps bits 0-3 and 16-19, as in dequant_word.
template <typename T>
__device__ inline void dequant_word_nat4(uint32_t wq, uint32_t s2, uint32_t b2, uint32_t (&out)[4]) {
  using Tr = Pair<T>;
  const uint32_t hi = wq >> 4;
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const uint32_t u = and_or<0x000F000Fu, Tr::kMagic>(__byte_perm(wq, hi, 0x0400u | (0x0101u * i)));
    out[i] = Tr::fma(Tr::sub(u, Tr::kMagic), s2, b2);
  }
}

// The x pairs matching dequant_word: X holds VPW consecutive values of one row (VPW/2 words).
template <int VPW>
__device__ inline void x_pairs(const uint32_t (&X)[VPW / 2], uint32_t (&out)[VPW / 2]) {
#pragma unroll
  for (int i = 0; i < VPW / 2; i++)  // one PRMT: the low (even i) or high halves of a and b
    out[i] = __byte_perm(X[i >> 1], X[(i >> 1) + VPW / 4], (i & 1) ? 0x7632u : 0x5410u);
}

// One weight set of one warp tile: W rows of an expert, its scales/biases, rows in range.
template <typename T>
struct WSet {
  const uint32_t* w;  // expert's (N, KW) words
  const T* s;         // expert's (N, KG) scales
  const T* b;         // expert's (N, KG) biases
};

// acc[ws][f][c][.] += W_ws[rows n0 + 16 f + (0..15)] . x[rows of column group c], over the
// k blocks kb = wk, wk + WK, ... (intra-block split-K). xrow[c]: this lane's activation row
// (column g of group c) or nullptr. Rows >= nlim and k >= K contribute zero.
// XS (4-bit only): x comes from a shared-memory tile staged by the whole block with cp.async
// (SS step buffers of KU k blocks) instead of per-warp global loads. Then xrow is unused; row_of(r)
// gives the x row of tile row r and xs is the tile. Requires WK == 1 (every warp walks every k
// block, so the block can barrier once per step).
template <int BM, int KU>
struct XsTile {
  static constexpr int GR = 16;  // 16-byte granules per row per k block (128 4-bit values)
  static constexpr int TILE = BM * GR * 8;  // 2-byte elements of one k block's tile
  // Step buffers (KU k blocks each): 3 when they fit in 40 KB, else 2.
  static constexpr int SS = TILE * 2 * KU * 3 <= 40 * 1024 ? 3 : 2;
  static constexpr int ELEMS = SS * KU * TILE;
  __device__ static int buf(int kb) { return ((kb / KU) % SS) * KU + kb % KU; }
  // Granule q of row r sits at q ^ 2*(q >= 8) ^ (r & 1): the 8 lanes of one LDS.128 phase
  // (rows g, g+1 x tig 0..3 at granules 4*tig + j) hit 8 distinct bank groups.
  __device__ static int phys(int r, int q) { return (r * GR + (q ^ ((q >> 3) << 1) ^ (r & 1))) * 8; }
};
// The shared-memory x path is used for 4-bit weights from BM = 16 on (measured on the H100: it
// wins there; at BM = 8 the per-warp prefetch in registers is as fast and needs no barriers).
template <int BITS, int BM>
struct UseXs {
  static constexpr bool value = BITS == 4 && BM >= 16;
};

// RING (shared-x path only): W comes through a ring of KU + 1 one-block register chunks instead of
// the double buffer of KU-block steps; see the XS loop below and qmm_impl for where it is used.
// PF > 0: each load of k block kb also prefetches into L2 the W chunks this lane will load PF of
// its k blocks later (kb + PF * WK). The register buffers hold one step ahead; with PF the DRAM
// requests go out earlier and that step's loads wait on L2 (H200 profiles, m=1 and m=32: latency-
// bound at 12-24% occupancy, DRAM 39-64%). Costs one instruction per 16-byte W load, no register.
// WS (shared-x path only): W chunks come through shared memory (wsm, dynamic) instead of the
// register double buffer. Each thread cp.asyncs its own 16-byte chunks into its own slots (wslot
// below) in the x tile's commit groups, so they are SS - 1 steps ahead like x, and reads them back
// (LDS.128) right before the dequantization; scales and biases stay one step ahead in registers
// (L1 hits after a row's first k block). Frees the W registers; at SS = 3 W is two steps ahead.
template <typename T, int BITS, int GS, int K, int FN, int CG, int NWS, int WK, int KU, bool XS = false,
          int NTHREADS = 32, typename RowFn = int, bool RING = false, int PF = 0, bool WS = false>
__device__ inline void warp_gemm(float (&acc)[NWS][FN][CG][4], const WSet<T> (&ws)[NWS], int n0,
                                 int nlim, const T* const (&xrow)[CG], int wk,
                                 T* xs = nullptr, const T* x_any = nullptr, RowFn row_of = 0,
                                 uint4* wsm = nullptr) {
  using Q = QGeom<BITS, GS, K>;
  using Tr = Pair<T>;
  static_assert(!XS || (BITS == 4 && WK == 1), "shared-memory x path: 4-bit, WK == 1");
  static_assert(!RING || XS, "the W ring is only wired into the shared-memory x path");
  static_assert(!WS || (XS && !RING), "W through shared memory: the shared-x path, without the W ring");
  static_assert(!WS || Q::CW == 4, "W through shared memory copies 16-byte chunks");
  using XT = XsTile<CG * 8, KU>;
  constexpr int GPT = XS ? (CG * 8 * XT::GR + NTHREADS - 1) / NTHREADS : 1;  // granules per thread
  const int lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;

  // x is prefetched with W while it fits in a few registers (small BM); otherwise it is loaded
  // (from L1/L2: every N tile re-reads the same rows) right before its mma.
  constexpr bool XPF = !XS && CG * Q::CW * (Q::VPW / 2) <= 32;
  struct Chunk {
    uint32_t w[NWS][FN][2][Q::CW];
    T s[NWS][FN][2];
    T b[NWS][FN][2];
    uint32_t x[XPF ? CG : 1][Q::CW][Q::VPW / 2];
  };
  auto load_x = [&](int kb, int c, int j, uint32_t (&X)[Q::VPW / 2]) {
    const int chunk = kb * 4 + tig;
    if (chunk * Q::VPL < K && xrow[c] != nullptr) {
      load_words<Q::VPW / 2>(
          reinterpret_cast<const uint32_t*>(xrow[c] + chunk * Q::VPL + j * Q::VPW), X);
    } else {
#pragma unroll
      for (int i = 0; i < Q::VPW / 2; i++) X[i] = 0u;
    }
  };
  // fn(s, f, h, n) for each W row of this lane (weight set s, fragment f, half h: row n), and the
  // address of its 16-byte chunk `chunk`: the PF and WS paths (the register path spells it out).
  auto each_row = [&](auto&& fn) {
#pragma unroll
    for (int s = 0; s < NWS; s++)
#pragma unroll
      for (int f = 0; f < FN; f++)
#pragma unroll
        for (int h = 0; h < 2; h++) fn(s, f, h, n0 + 16 * f + 8 * h + g);
  };
  auto w_at = [&](int s, int n, int chunk) { return ws[s].w + size_t(n) * Q::KW + chunk * Q::CW; };
  // Issue the global loads of k block kb (zeros where out of range) without consuming them.
  auto load = [&](int kb, Chunk& ch) {
    const int chunk = kb * 4 + tig;
    const bool kv = chunk * Q::VPL < K;
#pragma unroll
    for (int s = 0; s < NWS; s++)
#pragma unroll
      for (int f = 0; f < FN; f++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
          const int n = n0 + 16 * f + 8 * h + g;
          if (kv && n < nlim) {
            if constexpr (!WS) load_words<Q::CW>(ws[s].w + size_t(n) * Q::KW + chunk * Q::CW, ch.w[s][f][h]);
            const int gi = n * Q::KG + (chunk * Q::VPL) / GS;
            ch.s[s][f][h] = ws[s].s[gi];
            ch.b[s][f][h] = ws[s].b[gi];
          } else {
            if constexpr (!WS) {
#pragma unroll
              for (int i = 0; i < Q::CW; i++) ch.w[s][f][h][i] = 0u;
            }
            ch.s[s][f][h] = Tr::from_float(0.0f);
            ch.b[s][f][h] = Tr::from_float(0.0f);
          }
        }
    if constexpr (XPF) {
#pragma unroll
      for (int c = 0; c < CG; c++)
#pragma unroll
        for (int j = 0; j < Q::CW; j++) load_x(kb, c, j, ch.x[c][j]);
    }
    if constexpr (PF > 0) {
      const int pchunk = (kb + PF * WK) * 4 + tig;
      if (pchunk * Q::VPL < K)
        each_row([&](int s, int, int, int n) { if (n < nlim) prefetch_l2(w_at(s, n, pchunk)); });
    }
  };

  // WS slot of (k block kb, weight set s, fragment f, half h) for this thread, in 16-byte units:
  // [step % SS][kb % KU][s][f][h][thread]: a warp's LDS.128 reads 512 contiguous bytes.
  auto wslot = [&](int kb, int s, int f, int h) {
    constexpr int SS = XsTile<CG * 8, KU>::SS;
    return (((((kb / KU) % SS * KU + kb % KU) * NWS + s) * FN + f) * 2 + h) * NTHREADS + int(threadIdx.x);
  };
  auto compute = [&](int kb, const Chunk& ch) {
    uint32_t wv[WS ? NWS : 1][WS ? FN : 1][2][Q::CW];
    if constexpr (WS) {
      each_row([&](int s, int f, int h, int) {
        load_words<Q::CW>(reinterpret_cast<const uint32_t*>(wsm + wslot(kb, s, f, h)), wv[s][f][h]);
      });
    }
    auto wword = [&](int s, int f, int h, int j) -> uint32_t {
      if constexpr (WS) return wv[WS ? s : 0][WS ? f : 0][h][j];
      else return ch.w[s][f][h][j];
    };
    uint32_t s2[NWS][FN][2], b2[NWS][FN][2];
    float sf[NWS][FN][2], bf[NWS][FN][2];
#pragma unroll
    for (int s = 0; s < NWS; s++)
#pragma unroll
      for (int f = 0; f < FN; f++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
          s2[s][f][h] = splat(ch.s[s][f][h]);
          b2[s][f][h] = splat(ch.b[s][f][h]);
          sf[s][f][h] = Tr::to_float(ch.s[s][f][h]);
          bf[s][f][h] = Tr::to_float(ch.b[s][f][h]);
        }
#pragma unroll
    for (int j = 0; j < Q::CW; j++) {
      uint32_t a[NWS][FN][2][Q::PPW];
#pragma unroll
      for (int s = 0; s < NWS; s++)
#pragma unroll
        for (int f = 0; f < FN; f++)
#pragma unroll
          for (int h = 0; h < 2; h++) {
            if constexpr (XS)  // natural k order (4-bit only), x used as loaded below
              dequant_word_nat4<T>(wword(s, f, h, j), s2[s][f][h], b2[s][f][h], a[s][f][h]);
            else
              dequant_word<T, BITS>(wword(s, f, h, j), s2[s][f][h], b2[s][f][h], sf[s][f][h],
                                    bf[s][f][h], a[s][f][h]);
          }
#pragma unroll
      for (int c = 0; c < CG; c++) {
        uint32_t xp[Q::PPW];
        if constexpr (XS) {  // natural order: the 8 values of granule 4*tig + j are the 4 pairs
          const int r = 8 * c + g;
          load_words<Q::VPW / 2>(reinterpret_cast<const uint32_t*>(
              xs + XT::buf(kb) * XT::TILE + XT::phys(r, 4 * tig + j)), xp);
        } else if constexpr (XPF) {
          x_pairs<Q::VPW>(ch.x[c][j], xp);
        } else {
          uint32_t X[Q::VPW / 2];
          load_x(kb, c, j, X);
          x_pairs<Q::VPW>(X, xp);
        }
#pragma unroll
        for (int t = 0; t < Q::PPW / 2; t++) {
          const uint32_t bfrag[2] = {xp[2 * t], xp[2 * t + 1]};
#pragma unroll
          for (int s = 0; s < NWS; s++)
#pragma unroll
            for (int f = 0; f < FN; f++) {
              const uint32_t afrag[4] = {a[s][f][0][2 * t], a[s][f][1][2 * t],
                                         a[s][f][0][2 * t + 1], a[s][f][1][2 * t + 1]};
              Tr::mma(acc[s][f][c], afrag, bfrag);
            }
        }
      }
    }
  };

  // Register double buffer of KU k blocks: the next step's loads are in flight while this one
  // computes. With WK == 1 a step's KU blocks are adjacent, so each W row is read in KU*64-byte
  // runs (KU = 2: whole 128-byte lines) and KU times more bytes are in flight per warp.
  // PP: the step loop is unrolled twice so the two buffers swap roles by name; otherwise a
  // `cur = nxt` copy costs ~40 register moves per step, each waiting for its load (H100 qmv SASS:
  // 14% IMAD.MOV). H100 A/B of and_or + byte_perm + this unroll against the previous build
  // (sweeps/results/h100/ab/ab-pingpong.csv, gemma N=1408, interleaved rounds): faster for the
  // register-x path with KU = 1 (qmv +3..4%, BM8 FN1 +20% at m=2) and the shared-x path up to
  // CG * FN = 8 (BM32 FN2 +1..12%); slower for the register-x path with KU = 2 (-3..-8%) and
  // BM64 FN2 (-17%, register pressure): those keep the copy.
  constexpr bool PP = XS ? CG * FN <= 8 : KU == 1;
  Chunk buf[2][KU];
  auto load_step = [&](int base, Chunk (&c)[KU]) {
#pragma unroll
    for (int u = 0; u < KU; u++)
      if (base + u * WK < Q::NKB) load(base + u * WK, c[u]);
  };
  auto compute_step = [&](int base, const Chunk (&c)[KU]) {
#pragma unroll
    for (int u = 0; u < KU; u++)
      if (base + u * WK < Q::NKB) compute(base + u * WK, c[u]);
  };
  if constexpr (!XS && !PP) {
    constexpr int S = WK * KU;  // k blocks one warp advances per step
    if (wk < Q::NKB) load_step(wk, buf[1]);
    for (int base = wk; base < Q::NKB; base += S) {
#pragma unroll
      for (int u = 0; u < KU; u++) buf[0][u] = buf[1][u];
      if (base + S < Q::NKB) load_step(base + S, buf[1]);
      compute_step(base, buf[0]);
    }
  } else if constexpr (!XS) {
    constexpr int S = WK * KU;  // k blocks one warp advances per step
    if (wk < Q::NKB) load_step(wk, buf[0]);
    for (int base = wk; base < Q::NKB; base += 2 * S) {
#pragma unroll
      for (int r = 0; r < 2; r++) {
        const int b = base + r * S;
        if (b < Q::NKB) {
          if (b + S < Q::NKB) load_step(b + S, buf[r ^ 1]);
          compute_step(b, buf[r]);
        }
      }
    }
  } else {
    constexpr int NSTEP = (Q::NKB + KU - 1) / KU;
    // This thread copies granules gi = tid + t*NTHREADS of every k block's x tile.
    const T* src[GPT];  // x row of each granule (nullptr: past the chunk's rows -> zeros)
    int dst[GPT], col[GPT];
#pragma unroll
    for (int t = 0; t < GPT; t++) {
      const int gi = int(threadIdx.x) + t * NTHREADS;
      const int r = gi / XT::GR, q = gi % XT::GR;
      const bool live = r < CG * 8;
      src[t] = live ? row_of(r) : nullptr;
      dst[t] = live ? XT::phys(r, q) : -1;
      col[t] = q * 8;
    }
    auto issue_step = [&](int st) {
#pragma unroll
      for (int u = 0; u < KU; u++) {
        const int kb = st * KU + u;
        if (st < NSTEP && kb < Q::NKB) {
          T* tile = xs + XT::buf(kb) * XT::TILE;
#pragma unroll
          for (int t = 0; t < GPT; t++) {
            if (dst[t] < 0) continue;
            const int k = kb * Q::KB + col[t];
            const T* row = src[t];
            const bool pred = row != nullptr && k < K;
            cp_async_16_zfill(tile + dst[t], pred ? row + k : x_any, pred);
          }
          if constexpr (WS) {  // this thread's own W chunks of k block kb, in its own slots
            const int chunk = kb * 4 + tig;
            each_row([&](int s, int f, int h, int n) {
              const bool pred = chunk * Q::VPL < K && n < nlim;
              cp_async_16_zfill(wsm + wslot(kb, s, f, h), pred ? w_at(s, n, chunk) : ws[s].w, pred);
            });
          }
        }
      }
      cp_async_commit();  // always: keeps the group count uniform for cp_async_wait
    };
#pragma unroll
    for (int s0 = 0; s0 < XT::SS - 1; s0++) issue_step(s0);
    if constexpr (!RING && !PP) {
      load_step(0, buf[1]);
      for (int st = 0; st < NSTEP; st++) {
        cp_async_wait<XT::SS - 2>();
        __syncthreads();  // step st landed for every thread; the buffers of step st-1 are free
        issue_step(st + XT::SS - 1);
#pragma unroll
        for (int u = 0; u < KU; u++) buf[0][u] = buf[1][u];
        if (st + 1 < NSTEP) load_step((st + 1) * KU, buf[1]);
        compute_step(st * KU, buf[0]);
      }
    } else if constexpr (!RING) {
      load_step(0, buf[0]);
      for (int st0 = 0; st0 < NSTEP; st0 += 2) {
#pragma unroll
        for (int r = 0; r < 2; r++) {
          const int st = st0 + r;
          if (st < NSTEP) {  // uniform over the block (barrier inside)
            cp_async_wait<XT::SS - 2>();
            __syncthreads();  // step st landed for every thread; the buffers of step st-1 are free
            issue_step(st + XT::SS - 1);
            if (st + 1 < NSTEP) load_step((st + 1) * KU, buf[r ^ 1]);
            compute_step(st * KU, buf[r]);
          }
        }
      }
    } else {
      // W ring: KU + 1 one-block register chunks instead of 2 * KU; the loads of blocks
      // kb+1 .. kb+KU are issued before block kb is consumed (each one right after its slot was
      // consumed), so KU blocks stay in flight between steps too. The step loop is unrolled NB
      // times so that every ring index is a compile-time constant (st0 * KU is a multiple of
      // NB): no register moves, which would wait for the loads in flight.
      constexpr int NB = KU + 1;
      Chunk ring[NB];
#pragma unroll
      for (int u = 0; u < KU; u++)
        if (u < Q::NKB) load(u, ring[u]);
      for (int st0 = 0; st0 < NSTEP; st0 += NB) {
#pragma unroll
        for (int r = 0; r < NB; r++) {
          const int st = st0 + r;
          if (st < NSTEP) {  // uniform over the block (barrier inside)
            cp_async_wait<XT::SS - 2>();
            __syncthreads();  // step st landed for every thread; the buffers of step st-1 are free
            issue_step(st + XT::SS - 1);
#pragma unroll
            for (int u = 0; u < KU; u++) {
              const int kb = st * KU + u;
              if (kb + KU < Q::NKB) load(kb + KU, ring[(r * KU + u + KU) % NB]);
              if (kb < Q::NKB) compute(kb, ring[(r * KU + u) % NB]);
            }
          }
        }
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // the tile is reused by the next row chunk
  }
}

// Sum the WK partial tiles of the warps that share (wn) into warp wk == 0's acc.
// red: shared floats, (WK-1) * WN * ACC * 32. Every thread of the block must call this.
template <int ACC, int WN, int WK>
__device__ inline void reduce_split_k(float* acc, float* red, int wn, int wk) {
  if constexpr (WK > 1) {
    const int lane = threadIdx.x & 31;
    if (wk > 0) {
      float* dst = red + size_t((wk - 1) * WN + wn) * ACC * 32;
#pragma unroll
      for (int a = 0; a < ACC; a++) dst[a * 32 + lane] = acc[a];
    }
    __syncthreads();
    if (wk == 0) {
      for (int r = 0; r < WK - 1; r++) {
        const float* src = red + size_t(r * WN + wn) * ACC * 32;
#pragma unroll
        for (int a = 0; a < ACC; a++) acc[a] += src[a * 32 + lane];
      }
    }
    __syncthreads();  // red is reused by the next row chunk
  }
}

template <typename T, bool GLU>
__device__ inline T epilogue(float g, float u) {
  if constexpr (GLU) {
    return Pair<T>::from_float(g / (1.0f + expf(-g)) * u);  // silu(gate) * up
  } else {
    return Pair<T>::from_float(g);
  }
}

// ---- qmv / qmv_glu: one (token, expert) pair per block column, expert ids read directly -----
// Block b = p * NT + nt: pair p, N tile nt of 16*FN*WN rows; warps (wn, wk); column 0 only.
// GLU: a second weight set (w1/s1/b1) rides the same x loads and the result is silu(gate) * up
// (decode's gate+up in one launch instead of two kernels plus the elementwise epilogue).
template <typename T, int BITS, int GS, int K, int N, int E, int X_DIV, int FN, int WN, int WK,
          int KU, bool GLU = false, int PF = 0>
__device__ inline void qmv_impl(const T* x, const uint32_t* w0, const T* s0, const T* b0,
                                const uint32_t* w1, const T* s1, const T* b1,
                                const int32_t* idx, int P, T* y, float* red) {
  using Q = QGeom<BITS, GS, K>;
  constexpr int NWS = GLU ? 2 : 1;
  constexpr int BN = 16 * FN * WN;
  constexpr int NT = (N + BN - 1) / BN;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
  const int wn = warp % WN, wk = warp / WN;
  const int p = int(blockIdx.x) / NT, nt = int(blockIdx.x) % NT;
  if (p >= P) return;  // uniform over the block
  const int e = idx[p];
  const bool ok = e >= 0 && e < E;  // a bad id reads nothing and yields zeros (Python validates)
  const size_t eo = ok ? size_t(e) : 0;
  WSet<T> ws[NWS];
  ws[0] = WSet<T>{w0 + eo * N * Q::KW, s0 + eo * N * Q::KG, b0 + eo * N * Q::KG};
  if constexpr (GLU) ws[NWS - 1] = WSet<T>{w1 + eo * N * Q::KW, s1 + eo * N * Q::KG, b1 + eo * N * Q::KG};
  const T* xrow[1] = {g == 0 ? x + size_t(p / X_DIV) * K : nullptr};
  const int n0 = nt * BN + wn * 16 * FN;
  float acc[NWS][FN][1][4] = {};
  warp_gemm<T, BITS, GS, K, FN, 1, NWS, WK, KU, false, 32, int, false, PF>(acc, ws, n0, ok ? N : 0, xrow, wk);
  reduce_split_k<NWS * FN * 4, WN, WK>(&acc[0][0][0][0], red, wn, wk);
  if (wk == 0 && tig == 0) {  // column 0 = lanes with tig 0 hold c0 (row g) and c2 (row g+8)
    T* yr = y + size_t(p) * N;
#pragma unroll
    for (int f = 0; f < FN; f++)
#pragma unroll
      for (int h = 0; h < 2; h++) {
        const int n = n0 + 16 * f + 8 * h + g;
        if (n < N) yr[n] = epilogue<T, GLU>(acc[0][f][0][2 * h], acc[NWS - 1][f][0][2 * h]);
      }
  }
}

// ---- qmm / qmm_glu: expert-major, rows walked in BM chunks ------------------------------------
// A *unit* is a run of at most RPU = BM*MC sorted rows of one expert; block b = u * NT + nt.
// Units come from one of two routes (the launch's grid is an upper bound; spare blocks return):
// - PlanRoute (any id order; cuda/plan.cu sorted the pairs): expert e has ceil(rows_e / RPU)
//   units, numbered expert by expert from the offsets, so a hot expert is spread over many
//   blocks while experts with no rows cost nothing. Units: floor(P / RPU) + min(E, P) + 1.
// - SortedRoute (ids already grouped by expert, mlx-lm's sorted layout): no plan at all. The
//   sorted rows are cut into chunks of RPU; a unit is the run of one expert inside one chunk.
//   Unit u < C = ceil(P / RPU) takes the run that starts its chunk u; unit C + e takes expert
//   e's run that starts inside a chunk (at e's first row, found by a warp-wide search). Every
//   run starts either at a chunk start or at its expert's first row, so each row has one unit.
//   Units: C + E.
// Rows whose id is outside [0, E) are written as zeros and read no weights (PlanRoute: the
// plan's last bucket, zeroed by the last unit; SortedRoute: each chunk unit zeroes its own).
// Every warp of a block finds the same unit from the same data, so no barrier is needed.
template <int E, int RPU>
__device__ inline bool find_unit(const int32_t* offsets, int unit, int& e, int& r0, int& r1) {
  const int lane = threadIdx.x & 31;
  int base = 0;
  for (int e0 = 0; e0 < E; e0 += 32) {
    const int ee = e0 + lane;
    const int lo = ee < E ? offsets[ee] : 0, hi = ee < E ? offsets[ee + 1] : 0;
    const int units = (hi - lo + RPU - 1) / RPU;
    int inc = units;  // inclusive warp scan of unit counts
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int v = __shfl_up_sync(kFullMask, inc, d);
      if (lane >= d) inc += v;
    }
    const int first = base + inc - units;
    const unsigned hit = __ballot_sync(kFullMask, unit >= first && unit < first + units);
    if (hit != 0u) {
      int src = 0;
      while (((hit >> src) & 1u) == 0u) src++;
      e = e0 + src;
      const int s = unit - __shfl_sync(kFullMask, first, src);
      const int lo_e = __shfl_sync(kFullMask, lo, src), hi_e = __shfl_sync(kFullMask, hi, src);
      r0 = lo_e + s * RPU;
      r1 = min(hi_e, r0 + RPU);
      return true;
    }
    base += __shfl_sync(kFullMask, inc, 31);
  }
  return false;
}

// A unit as found: rows [r0, r1) of expert e get the GEMM (none when e is outside [0, E)), and
// the rows in [z0, z1) that the route calls bad get zeros.
struct Unit {
  int e, r0, r1, z0, z1;
};

template <int E, int RPU>
struct PlanRoute {
  const int32_t* order;
  const int32_t* offsets;
  int P;
  __device__ int pair(int i) const { return order[i]; }
  __device__ bool bad(int) const { return true; }  // z0..z1 is the plan's bucket of bad ids
  __device__ bool find(int unit, int units, Unit& u) const {
    if (unit == units - 1) {  // the last unit zeroes that bucket
      u = Unit{-1, 0, 0, offsets[E], P};
      return u.z0 < u.z1;
    }
    u.z0 = u.z1 = 0;
    return find_unit<E, RPU>(offsets, unit, u.e, u.r0, u.r1);
  }
};

// First i in [i0, i1) with ids[i] != e, else i1 (a warp reads 32 ids per step).
__device__ inline int run_end(const int32_t* ids, int i0, int i1, int e) {
  const int lane = threadIdx.x & 31;
  for (int b = i0; b < i1; b += 32) {
    const int i = b + lane;
    const unsigned diff = __ballot_sync(kFullMask, i < i1 && ids[i] != e);
    if (diff != 0u) return b + __ffs(int(diff)) - 1;
  }
  return i1;
}

// First i in [0, P) with ids[i] >= e, else P, for ids sorted ascending: each step the warp
// probes 32 evenly spaced ids and keeps the gap where they cross e (4 steps for 2^20 rows).
// Unsorted ids still give an index in [0, P] and terminate: the range shrinks every step.
__device__ inline int lower_bound_warp(const int32_t* ids, int P, int e) {
  const int lane = threadIdx.x & 31;
  int lo = 0, hi = P;  // the answer lies in [lo, hi]
  while (lo < hi) {
    const int stride = (hi - lo + 31) / 32;
    const int q = lo + lane * stride;
    const int below = __popc(__ballot_sync(kFullMask, q < hi && ids[q] < e));
    if (below == 0) return lo;
    lo += (below - 1) * stride + 1;
    hi = min(hi, lo - 1 + stride);
  }
  return lo;
}

template <int E, int RPU>
struct SortedRoute {
  const int32_t* ids;
  int P;
  __device__ int pair(int i) const { return i; }
  __device__ bool bad(int i) const { return ids[i] < 0 || ids[i] >= E; }
  __device__ bool find(int unit, int, Unit& u) const {
    const int chunks = (P + RPU - 1) / RPU;
    if (unit < chunks) {  // the run that starts chunk `unit`; the chunk's bad rows, if any
      const int c0 = unit * RPU, c1 = min(P, c0 + RPU);
      bool any_bad = false;
      for (int b = c0; b < c1 && !any_bad; b += 32) {
        const int i = b + int(threadIdx.x & 31);
        any_bad = __any_sync(kFullMask, i < c1 && bad(i));
      }
      const int e = ids[c0];
      u = Unit{e, c0, run_end(ids, c0 + 1, c1, e), c0, any_bad ? c1 : c0};
      return true;
    }
    const int e = unit - chunks;
    if (e >= E) return false;
    const int lo = lower_bound_warp(ids, P, e);
    if (lo >= P || lo % RPU == 0 || ids[lo] != e) return false;  // absent, or a chunk unit's
    u = Unit{e, lo, run_end(ids, lo + 1, min(P, (lo / RPU + 1) * RPU), e), 0, 0};
    return true;
  }
};

// Zeros in this warp's 16*FN columns from n0 for the bad rows among sorted positions [z0, z1).
template <typename T, int N, int FN, typename Route>
__device__ inline void zero_bad_rows(const Route& route, int z0, int z1, int n0, T* y) {
  const int lane = threadIdx.x & 31;
  for (int i = z0; i < z1; i++) {
    if (!route.bad(i)) continue;
    T* yr = y + size_t(route.pair(i)) * N;
    for (int c = lane; c < 16 * FN; c += 32)
      if (n0 + c < N) yr[n0 + c] = Pair<T>::from_float(0.0f);
  }
}

template <typename T, int BITS, int GS, int K, int N, int E, int X_DIV, int BM, int FN, int WN,
          int WK, int MC, int KU, bool GLU, int PF = 0, int WS = 0, typename Route>
__device__ inline void qmm_impl(const T* x, const uint32_t* w0, const T* s0, const T* b0,
                                const uint32_t* w1, const T* s1, const T* b1, const Route& route,
                                T* y, float* red, T* xs, uint4* wsm = nullptr) {
  using Q = QGeom<BITS, GS, K>;
  constexpr int NWS = GLU ? 2 : 1;
  constexpr int CG = BM / 8;
  constexpr int BN = 16 * FN * WN;
  constexpr int NT = (N + BN - 1) / BN;
  static_assert(BM % 8 == 0, "BM must be a multiple of 8");
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
  const int wn = warp % WN, wk = warp / WN;
  const int unit = int(blockIdx.x) / NT, nt = int(blockIdx.x) % NT;
  Unit un;
  // Every warp finds the same unit (no barrier needed); spare blocks leave together.
  if (!route.find(unit, int(gridDim.x) / NT, un)) return;
  const int n0 = nt * BN + wn * 16 * FN;
  if (wk == 0) zero_bad_rows<T, N, FN>(route, un.z0, un.z1, n0, y);
  if (un.e < 0 || un.e >= E) return;  // uniform over the block: a bad id reads no weights
  const int rbeg = un.r0, rend = un.r1;

  const size_t eo = size_t(un.e);
  WSet<T> ws[NWS];
  ws[0] = WSet<T>{w0 + eo * N * Q::KW, s0 + eo * N * Q::KG, b0 + eo * N * Q::KG};
  if constexpr (GLU) ws[NWS - 1] = WSet<T>{w1 + eo * N * Q::KW, s1 + eo * N * Q::KG, b1 + eo * N * Q::KG};

  for (int r0 = rbeg; r0 < rend; r0 += BM) {
    const T* xrow[CG];
#pragma unroll
    for (int c = 0; c < CG; c++) {
      const int i = r0 + 8 * c + g;
      xrow[c] = i < rend ? x + size_t(route.pair(i) / X_DIV) * K : nullptr;
    }
    float acc[NWS][FN][CG][4] = {};
    auto row_of = [&](int r) -> const T* {
      const int i = r0 + r;
      return i < rend ? x + size_t(route.pair(i) / X_DIV) * K : nullptr;
    };
    // The W ring (warp_gemm) where it measured faster on the H100, gemma-26b-a4b 4-bit gs64 bf16
    // (sweeps/results/h100/tuned-cuda-gemma-26b-a4b-v2-ab*.csv, old/new interleaved in one
    // process, two runs): shared-x path, KU = 2, CG * FN == 4 (BM16 FN2: +7.5% / +6.8% at m=16,
    // +8.3% / +8.1% at m=32; BM32 FN1: +3.9% / +4.4%). Not used where it measured slower or
    // even: BM16 FN1 (-2.2% / -0.3%), BM32 FN2 KU2 (-7%), BM64 (-6..-12%), BM8 KU2 (register x
    // path: -10..-16%, the double buffer there requests whole 128-byte lines per row), qmv.
    // qmm_glu (two weight sets) was not measured.
    constexpr bool XS = UseXs<BITS, BM>::value;
    static_assert(WS == 0 || XS, "WS=1 (W through shared memory) needs the shared-x path: 4-bit, BM >= 16");
    constexpr bool RING = XS && KU == 2 && NWS == 1 && CG * FN == 4 && WS == 0;
    warp_gemm<T, BITS, GS, K, FN, CG, NWS, WK, KU, XS, 32 * WN * WK, decltype(row_of), RING, PF, WS != 0>(
        acc, ws, n0, N, xrow, wk, xs, x, row_of, wsm);
    reduce_split_k<NWS * FN * CG * 4, WN, WK>(&acc[0][0][0][0], red, wn, wk);
    if (wk == 0) {
#pragma unroll
      for (int c = 0; c < CG; c++)
#pragma unroll
        for (int e2 = 0; e2 < 2; e2++) {
          const int i = r0 + 8 * c + 2 * tig + e2;  // C fragment column 2*tig + e2
          if (i >= rend) continue;
          T* yr = y + size_t(route.pair(i)) * N;
#pragma unroll
          for (int f = 0; f < FN; f++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
              const int n = n0 + 16 * f + 8 * h + g;
              if (n < N)
                yr[n] = epilogue<T, GLU>(acc[0][f][c][2 * h + e2], acc[NWS - 1][f][c][2 * h + e2]);
            }
        }
    }
  }
}

}  // namespace mmt
