// qmm_glu on ids already grouped by expert, with no routing plan (as metal/qmm_sorted.metal):
// y[i, :] = silu(x Wg^T) * (x Wu^T) with x = x[i / X_DIV] and expert ids[i].
// Body of mx.fast.metal_kernel; header metal/mmt_gather.h. Inputs: x, w_gate, scales_gate,
// biases_gate, w_up, scales_up, biases_up, ids. Template and launch as qmm.metal.
threadgroup T Xs[BM * (BK + 16 / sizeof(T))];
threadgroup T Wg[BN * (BK + 16 / sizeof(T))];
threadgroup T Wu[BN * (BK + 16 / sizeof(T))];
threadgroup int yrow[BM];
threadgroup int xrow[BM];
const int P = int(ids_shape[0]);
const int e = int(threadgroup_position_in_grid.y);
if (e == E) {  // negative ids sort first, ids >= E last
  mmt::zero_rows<T, N, BN, 32 * WM * WN, true>(y, ids, 0, mmt::lower_bound_ids(ids, P, 0),
      threadgroup_position_in_grid.x, thread_index_in_threadgroup);
  mmt::zero_rows<T, N, BN, 32 * WM * WN, true>(y, ids, mmt::lower_bound_ids(ids, P, E), P,
      threadgroup_position_in_grid.x, thread_index_in_threadgroup);
} else {
  mmt::qmm_impl<T, BITS, GS, K, N, X_DIV, BM, BN, BK, WM, WN, true, true>(
      x, w_gate, scales_gate, biases_gate, w_up, scales_up, biases_up, ids,
      mmt::lower_bound_ids(ids, P, e), mmt::lower_bound_ids(ids, P, e + 1), y, Xs, Wg, Wu, yrow, xrow,
      threadgroup_position_in_grid.x, uint(e), thread_index_in_threadgroup,
      simdgroup_index_in_threadgroup, thread_index_in_simdgroup);
}
