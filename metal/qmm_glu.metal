// qmm_glu (fused gate+up SwiGLU, expert-major): y[order[i], :] = silu(x Wg^T) * (x Wu^T) with
// x = x[order[i] / X_DIV] and both weight sets of expert e; one pass over x feeds both.
// Body of mx.fast.metal_kernel; header metal/mmt_gather.h. Inputs: x, w_gate, scales_gate,
// biases_gate, w_up, scales_up, biases_up, order, offsets. Template and launch as qmm.
threadgroup T Xs[BM * (BK + 16 / sizeof(T))];
threadgroup T Wg[BN * (BK + 16 / sizeof(T))];
threadgroup T Wu[BN * (BK + 16 / sizeof(T))];
threadgroup int yrow[BM];
threadgroup int xrow[BM];
const int e = int(threadgroup_position_in_grid.y);
if (e == E) {
  mmt::zero_rows<T, N, BN, 32 * WM * WN, false>(y, order, int(offsets[E]), int(order_shape[0]),
      threadgroup_position_in_grid.x, thread_index_in_threadgroup);
} else {
  mmt::qmm_impl<T, BITS, GS, K, N, X_DIV, BM, BN, BK, WM, WN, true, false>(
      x, w_gate, scales_gate, biases_gate, w_up, scales_up, biases_up, order,
      int(offsets[e]), int(offsets[e + 1]), y, Xs, Wg, Wu, yrow, xrow,
      threadgroup_position_in_grid.x, uint(e), thread_index_in_threadgroup,
      simdgroup_index_in_threadgroup, thread_index_in_simdgroup);
}
