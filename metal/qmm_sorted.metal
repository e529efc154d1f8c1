// qmm on ids already grouped by expert (mlx-lm's sorted layout), with no routing plan:
// y[i, :] = x[i / X_DIV] @ dequant(W[ids[i]])^T. Threadgroup (n tile, e) finds e's rows by a
// binary search of the ids, so the op is this one dispatch. Ids outside [0, E) give zero rows.
// Body of mx.fast.metal_kernel; header metal/mmt_gather.h. Inputs: x, w, scales, biases, ids.
// Template and launch as qmm.metal (the last row of threadgroups zeroes the bad ids' rows).
threadgroup T Xs[BM * (BK + 16 / sizeof(T))];
threadgroup T Ws[BN * (BK + 16 / sizeof(T))];
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
  mmt::qmm_impl<T, BITS, GS, K, N, X_DIV, BM, BN, BK, WM, WN, false, true>(
      x, w, scales, biases, w, scales, biases, ids,
      mmt::lower_bound_ids(ids, P, e), mmt::lower_bound_ids(ids, P, e + 1), y, Xs, Ws, Ws, yrow, xrow,
      threadgroup_position_in_grid.x, uint(e), thread_index_in_threadgroup,
      simdgroup_index_in_threadgroup, thread_index_in_simdgroup);
}
