// qmv_glu (no reuse, fused gate+up SwiGLU for decode): y[p, n] = silu(x . Wg[idx[p], n]) *
// (x . Wu[idx[p], n]) with x = x[p / X_DIV]; the two weight sets share every x load.
// Body of mx.fast.cuda_kernel; headers cuda/mmt_intrinsics.cuh, cuda/mmt_gather.cuh.
// Inputs: x, w_gate, scales_gate, biases_gate, w_up, scales_up, biases_up, idx. Template and
// launch as qmv.
__shared__ float mmt_red[WK > 1 ? (WK - 1) * WN * 2 * FN * 4 * 32 : 1];
mmt::qmv_impl<T, BITS, GS, K, N, E, X_DIV, FN, WN, WK, KU, true, PF>(
    x, w_gate, scales_gate, biases_gate, w_up, scales_up, biases_up, idx, int(idx_shape[0]), y,
    mmt_red);
