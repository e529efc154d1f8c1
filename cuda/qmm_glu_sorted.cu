// qmm_glu on ids already grouped by expert, with no routing plan (as cuda/qmm_sorted.cu):
// y[i, :] = silu(x Wg^T) * (x Wu^T) with x = x[i / X_DIV] and expert ids[i].
// Body of mx.fast.cuda_kernel; headers as qmm.cu. Inputs: x, w_gate, scales_gate, biases_gate,
// w_up, scales_up, biases_up, ids. Template as qmm.cu; launch as qmm_sorted.cu.
__shared__ float mmt_red[WK > 1 ? (WK - 1) * WN * 2 * FN * (BM / 8) * 4 * 32 : 1];
__shared__ __align__(16) T mmt_xs[mmt::UseXs<BITS, BM>::value ? mmt::XsTile<BM, KU>::ELEMS : 8];
extern __shared__ __align__(16) uint4 mmt_ws[];
const mmt::SortedRoute<E, BM * MC> route{ids, int(ids_shape[0])};
mmt::qmm_impl<T, BITS, GS, K, N, E, X_DIV, BM, FN, WN, WK, MC, KU, true, PF, WS>(
    x, w_gate, scales_gate, biases_gate, w_up, scales_up, biases_up, route, y, mmt_red, mmt_xs,
    mmt_ws);
