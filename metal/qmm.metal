// qmm (reuse, expert-major): for every sorted position i of expert e (offsets[e] <= i <
// offsets[e+1]), y[order[i], :] = x[order[i] / X_DIV] @ dequant(W[e])^T.
// Body of mx.fast.metal_kernel; header metal/mmt_gather.h. Inputs: x, w, scales, biases, order,
// offsets. Template: T, BITS, GS, K, N, E, X_DIV, BM, BN, BK, WM, WN.
// Launch: threadgroup (32*WM*WN, 1, 1); grid (32*WM*WN * ceil(N/BN), E + 1, 1): the last row of
// threadgroups zeroes the rows of ids outside [0, E) (the plan's last bucket). Sorted ids:
// metal/qmm_sorted.metal.
// Threadgroup arrays live here because Metal only allows them at kernel scope.
threadgroup T Xs[BM * (BK + 16 / sizeof(T))];
threadgroup T Ws[BN * (BK + 16 / sizeof(T))];
threadgroup int yrow[BM];
threadgroup int xrow[BM];
const int e = int(threadgroup_position_in_grid.y);
if (e == E) {
  mmt::zero_rows<T, N, BN, 32 * WM * WN, false>(y, order, int(offsets[E]), int(order_shape[0]),
      threadgroup_position_in_grid.x, thread_index_in_threadgroup);
} else {
  mmt::qmm_impl<T, BITS, GS, K, N, X_DIV, BM, BN, BK, WM, WN, false, false>(
      x, w, scales, biases, w, scales, biases, order,
      int(offsets[e]), int(offsets[e + 1]), y, Xs, Ws, Ws, yrow, xrow,
      threadgroup_position_in_grid.x, uint(e), thread_index_in_threadgroup,
      simdgroup_index_in_threadgroup, thread_index_in_simdgroup);
}
