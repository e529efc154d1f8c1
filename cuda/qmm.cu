// qmm (reuse, expert-major): for every sorted position i of expert e (offsets[e] <= i <
// offsets[e+1]), y[order[i], :] = x[order[i] / X_DIV] @ dequant(W[e])^T.
// Body of mx.fast.cuda_kernel; headers cuda/mmt_intrinsics.cuh, cuda/mmt_gather.cuh.
// Inputs: x, w, scales, biases, order, offsets. Template: T, BITS, GS, K, N, E, X_DIV, BM (rows
// per chunk = mma n side, multiple of 8), FN, WN, WK (as qmv), MC (chunks per block: row split).
// Launch: block 32*WN*WK threads; grid (P / (BM*MC) + min(E, P)) * ceil(N / (16*FN*WN)) blocks.
__shared__ float mmt_red[WK > 1 ? (WK - 1) * WN * FN * (BM / 8) * 4 * 32 : 1];
mmt::qmm_impl<T, BITS, GS, K, N, E, X_DIV, BM, FN, WN, WK, MC, false>(
    x, w, scales, biases, w, scales, biases, order, offsets, y, mmt_red);
