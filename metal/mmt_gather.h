// mlx-moe-tune: shared Metal helpers for the gather_qmm kernel families (qmv, qmm, qmm_glu).
//
// Prepended as `header` to mx.fast.metal_kernel sources, after MLX's own utils (bf16 etc.).
// Nothing else is included there, so this file uses only the Metal standard library names that
// MLX's kernels use, fully qualified with `metal::`. Rules that keep it compiling on Apple's
// compiler are in metal/README.md. The kernel I/O contract is in TEAM.md (mirrors CUDA).
//
// Input pointers reach these helpers through template parameters (XPtr, WPtr, ...), never as
// `const device T*`: mx.fast.metal_kernel turns inputs with fewer than 8 elements (order/offsets
// of tiny problems, the expert list of a decode step) into `constant` pointers, and a template
// keeps whichever address space the generated signature chose.

namespace mmt {

// Affine dequantization of one packed uint32 word: element i sits at bits [i*BITS, (i+1)*BITS)
// (LSB first, MLX's layout for BITS in {2, 4, 8}).
template <int BITS>
inline float unpack_q(uint word, int i) {
  return float((word >> (BITS * i)) & ((1u << BITS) - 1u));
}

// 2^-(BITS*i): undoes the bit position of value i of a 16-bit half-word (see qmv_impl).
template <int BITS>
inline float half_word_scale(int i) {
  return 1.0f / float(1u << (BITS * i));
}

// ---------------------------------------------------------------------------------------------
// qmv: no-reuse gather matvec (decode). See metal/qmv.metal for the tiling.
// ---------------------------------------------------------------------------------------------
// GLU: a second weight set (wu/su/bu) shares every x load and the result is
// silu(x Wg^T) * (x Wu^T), decode's gate+up in one launch (qmv_glu.metal).
template <
    typename T, int BITS, int GS, int K, int N, int E, int X_DIV,
    int RPS, int SG, int VPT, int PR, bool GLU,
    typename XPtr, typename WPtr, typename SPtr, typename IPtr>
inline void qmv_impl(
    XPtr x, WPtr w, SPtr scales, SPtr biases, WPtr wu, SPtr su, SPtr bu, IPtr idx, int P,
    device T* y, uint pair_block, uint n_block, uint sgid, uint lane) {
  constexpr int NWS = GLU ? 2 : 1;  // weight sets
  constexpr int PF = 32 / BITS;  // values per packed word
  constexpr int WPT = VPT / PF;  // words per lane per K step
  constexpr int KW = K / PF;     // words per weight row
  constexpr int KG = K / GS;     // groups per weight row
  constexpr int STEP = 32 * VPT; // K values one simdgroup covers per step
  constexpr int HALF = PF / 2;   // values per 16-bit half-word

  const int p0 = int(pair_block) * PR;
  const int n0 = int(n_block) * (SG * RPS) + int(sgid) * RPS;

  // The PR pairs of this threadgroup: their expert and x row. Dead pairs (past P) are skipped;
  // a pair whose id is outside [0, E) reads no weights and its row comes out as zeros.
  int ex[PR];
  int xr[PR];
  bool live[PR];
  for (int j = 0; j < PR; j++) {
    const int p = p0 + j;
    live[j] = p < P;
    const int id = live[j] ? int(idx[p]) : -1;
    ex[j] = id >= 0 && id < E ? id : -1;
    xr[j] = live[j] ? p / X_DIV : 0;
  }

  float acc[NWS][PR][RPS];
  for (int ws = 0; ws < NWS; ws++) {
    for (int j = 0; j < PR; j++) {
      for (int r = 0; r < RPS; r++) {
        acc[ws][j][r] = 0.0f;
      }
    }
  }

  // Each lane owns VPT consecutive K values per step; VPT divides GS, so the chunk has one
  // scale/bias, and (VPT*BITS) % 32 == 0, so it is whole words. K % VPT == 0 (GS | K), so a
  // lane's chunk is entirely inside or outside K: no partial chunk at the tail.
  for (int k = int(lane) * VPT; k < K; k += STEP) {
    float xv[PR][VPT];
    float xs[PR];
    for (int j = 0; j < PR; j++) {
      xs[j] = 0.0f;
      for (int i = 0; i < VPT; i++) {
        const float v = live[j] ? static_cast<float>(x[size_t(xr[j]) * K + k + i]) : 0.0f;
        xs[j] += v;
        // Pre-divide by the bit position the value's q keeps inside its 16-bit half-word, so
        // the dot product below needs a mask but no shift (MLX's load_vector/qdot trick; the
        // scale is a power of two, so this is exact).
        xv[j][i] = v * half_word_scale<BITS>(i % HALF);
      }
    }
    const int g = k / GS;
    for (int r = 0; r < RPS; r++) {
      const int n = n0 + r;
      if (n >= N) {
        break;  // uniform across the simdgroup: all lanes share n
      }
      for (int ws = 0; ws < NWS; ws++) {
        WPtr wp = ws == 0 ? w : wu;
        SPtr sp = ws == 0 ? scales : su;
        SPtr bp = ws == 0 ? biases : bu;
        // Pairs that share an expert reuse the words already in registers (sorted layouts).
        int cur = -1;
        uint wq[WPT];
        float s = 0.0f;
        float b = 0.0f;
        for (int j = 0; j < PR; j++) {
          if (ex[j] < 0) {
            continue;
          }
          if (ex[j] != cur) {
            cur = ex[j];
            const size_t row = size_t(cur) * N + n;
            for (int t = 0; t < WPT; t++) {
              wq[t] = wp[row * KW + k / PF + t];
            }
            s = static_cast<float>(sp[row * KG + g]);
            b = static_cast<float>(bp[row * KG + g]);
          }
          float d = 0.0f;
          for (int t = 0; t < WPT; t++) {
            const uint lo = wq[t] & 0xffffu;
            const uint hi = wq[t] >> 16;
            for (int i = 0; i < HALF; i++) {
              const uint mask = ((1u << BITS) - 1u) << (BITS * i);
              d += xv[j][t * PF + i] * float(lo & mask);
              d += xv[j][t * PF + HALF + i] * float(hi & mask);
            }
          }
          // sum_i x_i * (s*q_i + b) = s * sum_i x_i q_i + b * sum_i x_i
          acc[ws][j][r] += s * d + b * xs[j];
        }
      }
    }
  }

  // Every lane reaches the reductions (lanes that ran out of K carry zeros).
  for (int r = 0; r < RPS; r++) {
    const int n = n0 + r;
    for (int j = 0; j < PR; j++) {
      const float gate = metal::simd_sum(acc[0][j][r]);
      const float up = GLU ? metal::simd_sum(acc[NWS - 1][j][r]) : 0.0f;
      if (lane == 0 && n < N && live[j]) {
        y[size_t(p0 + j) * N + n] = static_cast<T>(GLU ? gate / (1.0f + metal::exp(-gate)) * up : gate);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// qmm / qmm_glu: expert-major tiles with threadgroup staging and 8x8 simdgroup matrices.
// ---------------------------------------------------------------------------------------------

// Stage x rows [BM x BK] of the current row chunk into threadgroup memory. `xrow[r]` is the x row
// of tile row r, or -1 for rows past the expert's end (zero-filled so they add nothing).
template <typename T, int K, int BM, int BK, int LD, int NT, typename XPtr>
inline void load_x_tile(
    threadgroup T* Xs, XPtr x, const threadgroup int* xrow, int k0, uint tid) {
  for (int v = int(tid); v < BM * BK; v += NT) {
    const int r = v / BK;
    const int c = v % BK;
    const int src = xrow[r];
    const int k = k0 + c;
    Xs[r * LD + c] = (src >= 0 && k < K) ? static_cast<T>(x[size_t(src) * K + k]) : T(0);
  }
}

// Dequantize W rows [n0, n0+BN) x K columns [k0, k0+BK) of one expert into threadgroup memory,
// laid out [BN][LD] (transposed relative to the MMA's B operand). One packed word per step, so
// every thread issues whole 32-bit loads; rows past N and columns past K become zeros. Values are
// rounded to T, as MLX's QuantizedBlockLoader does, so the MMA inputs match stock MLX.
template <
    typename T, int BITS, int GS, int K, int N, int BN, int BK, int LD, int NT,
    typename WPtr, typename SPtr>
inline void load_w_tile(
    threadgroup T* Ws, WPtr w, SPtr scales, SPtr biases, size_t e, int n0, int k0, uint tid) {
  constexpr int PF = 32 / BITS;
  constexpr int WPR = BK / PF;  // words per tile row
  constexpr int KW = K / PF;
  constexpr int KG = K / GS;
  for (int v = int(tid); v < BN * WPR; v += NT) {
    const int r = v / WPR;
    const int c = v % WPR;
    const int n = n0 + r;
    const int k = k0 + c * PF;
    threadgroup T* dst = Ws + r * LD + c * PF;
    if (n < N && k < K) {
      const size_t row = e * N + n;
      const uint word = w[row * KW + k / PF];
      const float s = static_cast<float>(scales[row * KG + k / GS]);
      const float b = static_cast<float>(biases[row * KG + k / GS]);
      for (int i = 0; i < PF; i++) {
        dst[i] = static_cast<T>(s * unpack_q<BITS>(word, i) + b);
      }
    } else {
      for (int i = 0; i < PF; i++) {
        dst[i] = T(0);
      }
    }
  }
}

// Lane -> element coordinates of an 8x8 simdgroup matrix (the mapping MLX's steel BaseMMAFrag
// uses): lane holds row fm, columns fn and fn+1.
inline short frag_row(uint lane) {
  const short qid = short(lane / 4);
  return (qid & 4) + short((lane / 2) % 4);
}
inline short frag_col(uint lane) {
  const short qid = short(lane / 4);
  return (qid & 2) * 2 + short(lane % 2) * 2;
}

// One 8-deep slice of the simdgroup's [TM*8 x TN*8] tile: acc += Xs[:, kk:kk+8] @ Ws[:, kk:kk+8]^T.
// Xs/Ws already point at this simdgroup's first row/column. Fragments are float (as in MLX's
// BlockMMA), so half/bfloat16 inputs accumulate in float. acc holds 2 floats per fragment.
template <typename T, int TM, int TN, int LDX, int LDW>
inline void mma_k8(
    thread float* acc, const threadgroup T* Xs, const threadgroup T* Ws, int kk, short fm,
    short fn) {
  float a[TM][2];
  for (int i = 0; i < TM; i++) {
    a[i][0] = static_cast<float>(Xs[(i * 8 + fm) * LDX + kk + fn]);
    a[i][1] = static_cast<float>(Xs[(i * 8 + fm) * LDX + kk + fn + 1]);
  }
  for (int j = 0; j < TN; j++) {
    // B[k][n] = Ws[n][k]: this lane's B elements are (k = fm, n = fn) and (k = fm, n = fn+1).
    metal::simdgroup_matrix<float, 8, 8> B;
    B.thread_elements()[0] = static_cast<float>(Ws[(j * 8 + fn) * LDW + kk + fm]);
    B.thread_elements()[1] = static_cast<float>(Ws[(j * 8 + fn + 1) * LDW + kk + fm]);
    for (int i = 0; i < TM; i++) {
      metal::simdgroup_matrix<float, 8, 8> A;
      metal::simdgroup_matrix<float, 8, 8> C;
      A.thread_elements()[0] = a[i][0];
      A.thread_elements()[1] = a[i][1];
      C.thread_elements()[0] = acc[(i * TN + j) * 2];
      C.thread_elements()[1] = acc[(i * TN + j) * 2 + 1];
      metal::simdgroup_multiply_accumulate(C, A, B, C);
      acc[(i * TN + j) * 2] = C.thread_elements()[0];
      acc[(i * TN + j) * 2 + 1] = C.thread_elements()[1];
    }
  }
}

// First i in [0, P) with ids[i] >= e (P if none), for ids sorted ascending. Unsorted ids still
// give an index in [0, P].
template <typename IPtr>
inline int lower_bound_ids(IPtr ids, int P, int e) {
  int lo = 0;
  int hi = P;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (int(ids[mid]) < e) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Zeros in output columns [n_block*BN, +BN) for the rows at sorted positions [r0, r1): pair
// order[i], or i itself for SORTED ids. The rows of ids outside [0, E) (no weights are read).
template <typename T, int N, int BN, int NT, bool SORTED, typename OPtr>
inline void zero_rows(device T* y, OPtr order, int r0, int r1, uint n_block, uint tid) {
  const int n0 = int(n_block) * BN;
  for (int t = int(tid); t < (r1 - r0) * BN; t += NT) {
    const int i = r0 + t / BN;
    const int n = n0 + t % BN;
    if (n < N) {
      const int p = SORTED ? i : int(order[i]);
      y[size_t(p) * N + n] = static_cast<T>(0.0f);
    }
  }
}

// Expert-major gather matmul. The threadgroup owns (expert e, output columns [n0, n0+BN)) and
// walks all of e's rows (sorted positions row_begin .. row_end) in chunks of BM: each chunk
// runs one K loop, so a chunk never straddles experts and no K loop is wasted (unlike MLX's
// gather_qmm_rhs). GLU: a second weight set (wu/su/bu) shares each staged x tile and the result
// is silu(x Wg^T) * (x Wu^T), the SwiGLU of mlx-lm's SwitchGLU.
template <
    typename T, int BITS, int GS, int K, int N, int X_DIV,
    int BM, int BN, int BK, int WM, int WN, bool GLU, bool SORTED,
    typename XPtr, typename WPtr, typename SPtr, typename OPtr>
inline void qmm_impl(
    XPtr x, WPtr wg, SPtr sg, SPtr bg, WPtr wu, SPtr su, SPtr bu, OPtr order, int row_begin,
    int row_end, device T* y, threadgroup T* Xs, threadgroup T* Wgs, threadgroup T* Wus,
    threadgroup int* yrow, threadgroup int* xrow, uint n_block, uint expert, uint tid, uint sgid,
    uint lane) {
  constexpr int NT = 32 * WM * WN;
  constexpr int PAD = 16 / sizeof(T);  // 16-byte row padding against bank conflicts (as MLX)
  constexpr int LDX = BK + PAD;
  constexpr int LDW = BK + PAD;
  constexpr int SM = BM / WM;  // rows per simdgroup
  constexpr int SN = BN / WN;  // columns per simdgroup
  constexpr int TM = SM / 8;
  constexpr int TN = SN / 8;

  const size_t e = expert;
  const int n0 = int(n_block) * BN;
  // (An expert with no rows skips the loop below; the whole threadgroup agrees, so no thread
  // waits at a barrier another thread never reaches.)

  const int wm = int(sgid) / WN;
  const int wn = int(sgid) % WN;
  const short fm = frag_row(lane);
  const short fn = frag_col(lane);
  const threadgroup T* Xsg = Xs + wm * SM * LDX;
  const threadgroup T* Wgsg = Wgs + wn * SN * LDW;
  const threadgroup T* Wusg = Wus + wn * SN * LDW;

  for (int r0 = row_begin; r0 < row_end; r0 += BM) {
    // The previous chunk's epilogue still reads yrow: wait before overwriting it.
    metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
    for (int t = int(tid); t < BM; t += NT) {
      const int i = r0 + t;
      const int p = i < row_end ? (SORTED ? i : int(order[i])) : -1;
      yrow[t] = p;
      xrow[t] = p >= 0 ? p / X_DIV : -1;
    }
    metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);

    float accg[TM * TN * 2];
    float accu[GLU ? TM * TN * 2 : 1];
    for (int i = 0; i < TM * TN * 2; i++) {
      accg[i] = 0.0f;
      if (GLU) {
        accu[i] = 0.0f;
      }
    }

    for (int k0 = 0; k0 < K; k0 += BK) {
      load_x_tile<T, K, BM, BK, LDX, NT>(Xs, x, xrow, k0, tid);
      load_w_tile<T, BITS, GS, K, N, BN, BK, LDW, NT>(Wgs, wg, sg, bg, e, n0, k0, tid);
      if (GLU) {
        load_w_tile<T, BITS, GS, K, N, BN, BK, LDW, NT>(Wus, wu, su, bu, e, n0, k0, tid);
      }
      metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
      for (int kk = 0; kk < BK; kk += 8) {
        mma_k8<T, TM, TN, LDX, LDW>(accg, Xsg, Wgsg, kk, fm, fn);
        if (GLU) {
          mma_k8<T, TM, TN, LDX, LDW>(accu, Xsg, Wusg, kk, fm, fn);
        }
      }
      // Tiles are overwritten by the next K step.
      metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
    }

    // Epilogue: write this lane's elements straight to y row order[i] (the unsort is fused).
    for (int i = 0; i < TM; i++) {
      const int p = yrow[wm * SM + i * 8 + fm];
      if (p < 0) {
        continue;
      }
      for (int j = 0; j < TN; j++) {
        for (int c = 0; c < 2; c++) {
          const int n = n0 + wn * SN + j * 8 + fn + c;
          if (n < N) {
            float v = accg[(i * TN + j) * 2 + c];
            if (GLU) {
              // silu(g) * u, in float before the single rounding to T
              v = v / (1.0f + metal::exp(-v)) * accu[(i * TN + j) * 2 + c];
            }
            y[size_t(p) * N + n] = static_cast<T>(v);
          }
        }
      }
    }
  }
}

}  // namespace mmt
