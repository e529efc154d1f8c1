// qmv_glu (no reuse, fused gate+up SwiGLU for decode): y[p, n] = silu(x . Wg[idx[p], n]) *
// (x . Wu[idx[p], n]) with x = x[p / X_DIV]; the two weight sets share every x load.
// Body of mx.fast.metal_kernel; header metal/mmt_gather.h. Inputs: x, w_gate, scales_gate,
// biases_gate, w_up, scales_up, biases_up, idx. Template and launch as qmv.
mmt::qmv_impl<T, BITS, GS, K, N, E, X_DIV, RPS, SG, VPT, PR, true>(
    x, w_gate, scales_gate, biases_gate, w_up, scales_up, biases_up, idx, int(idx_shape[0]), y,
    threadgroup_position_in_grid.x, threadgroup_position_in_grid.y,
    simdgroup_index_in_threadgroup, thread_index_in_simdgroup);
