// qmm (reuse, expert-major): for every sorted position i of expert e (offsets[e] <= i <
// offsets[e+1]), y[order[i], :] = x[order[i] / X_DIV] @ dequant(W[e])^T.
// Body of mx.fast.cuda_kernel; headers cuda/mmt_intrinsics.cuh, cuda/mmt_gather.cuh.
// Inputs: x, w, scales, biases, order, offsets. Template: T, BITS, GS, K, N, E, X_DIV, BM (rows
// per chunk = mma n side, multiple of 8), FN, WN, WK, KU (as qmv), MC (chunks per block: row
// split), PF (as qmv), WS (1: W through dynamic shared memory too; shared-x path only). 4-bit
// with BM >= 16 stages x in shared memory through a cp.async pipeline (UseXs).
// Launch: block 32*WN*WK threads; grid (P / (BM*MC) + min(E, P) + 1) * ceil(N / (16*FN*WN))
// blocks (the last unit zeroes the rows of ids outside [0, E)). Sorted ids: cuda/qmm_sorted.cu.
__shared__ float mmt_red[WK > 1 ? (WK - 1) * WN * FN * (BM / 8) * 4 * 32 : 1];
__shared__ __align__(16) T mmt_xs[mmt::UseXs<BITS, BM>::value ? mmt::XsTile<BM, KU>::ELEMS : 8];
extern __shared__ __align__(16) uint4 mmt_ws[];  // WS=1: W slots (dynamic; WS=0 launches none)
const mmt::PlanRoute<E, BM * MC> route{order, offsets, int(order_shape[0])};
mmt::qmm_impl<T, BITS, GS, K, N, E, X_DIV, BM, FN, WN, WK, MC, KU, false, PF, WS>(
    x, w, scales, biases, w, scales, biases, route, y, mmt_red, mmt_xs, mmt_ws);
