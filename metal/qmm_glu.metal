// qmm_glu (fused gate+up SwiGLU, expert-major): y[order[i], :] = silu(x Wg^T) * (x Wu^T) with
// x = x[order[i] / X_DIV] and both weight sets of expert e; one pass over x feeds both.
// Body of mx.fast.metal_kernel; header metal/mmt_gather.h. Inputs: x, w_gate, scales_gate,
// biases_gate, w_up, scales_up, biases_up, order, offsets. Template and launch as qmm.
threadgroup T Xs[BM * (BK + 16 / sizeof(T))];
threadgroup T Wg[BN * (BK + 16 / sizeof(T))];
threadgroup T Wu[BN * (BK + 16 / sizeof(T))];
threadgroup int yrow[BM];
threadgroup int xrow[BM];
mmt::qmm_impl<T, BITS, GS, K, N, X_DIV, BM, BN, BK, WM, WN, true>(
    x, w_gate, scales_gate, biases_gate, w_up, scales_up, biases_up, order, offsets, y,
    Xs, Wg, Wu, yrow, xrow,
    threadgroup_position_in_grid.x, threadgroup_position_in_grid.y,
    thread_index_in_threadgroup, simdgroup_index_in_threadgroup, thread_index_in_simdgroup);
