// qmm_glu (fused gate+up SwiGLU, expert-major): y[order[i], :] = silu(x Wg^T) * (x Wu^T) with
// x = x[order[i] / X_DIV] and both weight sets of expert e; one pass over x feeds both.
// Body of mx.fast.cuda_kernel; headers cuda/mmt_intrinsics.cuh, cuda/mmt_gather.cuh.
// Inputs: x, w_gate, scales_gate, biases_gate, w_up, scales_up, biases_up, order, offsets.
// Template and launch as qmm.
__shared__ float mmt_red[WK > 1 ? (WK - 1) * WN * 2 * FN * (BM / 8) * 4 * 32 : 1];
__shared__ __align__(16) T mmt_xs[mmt::UseXs<BITS, BM>::value ? mmt::XsTile<BM, KU>::ELEMS : 8];
extern __shared__ __align__(16) uint4 mmt_ws[];  // WS=1: W slots (dynamic; WS=0 launches none)
const mmt::PlanRoute<E, BM * MC> route{order, offsets, int(order_shape[0])};
mmt::qmm_impl<T, BITS, GS, K, N, E, X_DIV, BM, FN, WN, WK, MC, KU, true, PF, WS>(
    x, w_gate, scales_gate, biases_gate, w_up, scales_up, biases_up, route, y, mmt_red, mmt_xs, mmt_ws);
