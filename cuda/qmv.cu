// qmv (no reuse, decode / small m): y[p, n] = x[p / X_DIV] . dequant(W[idx[p], n]).
// Body of mx.fast.cuda_kernel; headers cuda/mmt_intrinsics.cuh, cuda/mmt_gather.cuh.
// Inputs: x, w, scales, biases, idx. Template: T, BITS, GS, K, N, E, X_DIV, FN (16-row mma
// fragments per warp), WN (warps along N), WK (warps splitting K inside the block), KU (k blocks
// loaded per step and warp: bytes in flight), PF (L2 prefetch distance in k blocks, 0 = none).
// Launch: block 32*WN*WK threads; grid P * ceil(N / (16*FN*WN)) blocks on x.
// Expert ids are read directly (no sort), so a decode step is a single launch.
__shared__ float mmt_red[WK > 1 ? (WK - 1) * WN * FN * 4 * 32 : 1];
mmt::qmv_impl<T, BITS, GS, K, N, E, X_DIV, FN, WN, WK, KU, false, PF>(
    x, w, scales, biases, w, scales, biases, idx, int(idx_shape[0]), y, mmt_red);
