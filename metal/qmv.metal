// qmv (no reuse, decode / small m): y[p, n] = x[p / X_DIV] . dequant(W[idx[p], n]).
// Body of mx.fast.metal_kernel; header metal/mmt_gather.h. Inputs: x, w, scales, biases, idx.
// Template: T, BITS, GS, K, N, E, X_DIV, RPS (output rows per simdgroup), SG (simdgroups per
// threadgroup), VPT (K values per lane per step), PR (pairs per threadgroup, in registers).
// Launch: threadgroup (32*SG, 1, 1); grid (32*SG * ceil(P/PR), ceil(N/(SG*RPS)), 1).
// Pairs on the grid's x axis: it is the only one that grows with the number of tokens.
mmt::qmv_impl<T, BITS, GS, K, N, E, X_DIV, RPS, SG, VPT, PR, false>(
    x, w, scales, biases, w, scales, biases, idx, int(idx_shape[0]), y,
    threadgroup_position_in_grid.x, threadgroup_position_in_grid.y,
    simdgroup_index_in_threadgroup, thread_index_in_simdgroup);
