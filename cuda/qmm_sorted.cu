// qmm on ids already grouped by expert (mlx-lm's sorted layout), with no routing plan:
// y[i, :] = x[i / X_DIV] @ dequant(W[ids[i]])^T. Each block finds its run of rows in the ids
// themselves (mmt::SortedRoute), so the op is this one launch. Ids outside [0, E) give zero rows.
// Body of mx.fast.cuda_kernel; headers as qmm.cu. Inputs: x, w, scales, biases, ids.
// Template as qmm.cu. Launch: grid (ceil(P / (BM*MC)) + E) * ceil(N / (16*FN*WN)) blocks.
__shared__ float mmt_red[WK > 1 ? (WK - 1) * WN * FN * (BM / 8) * 4 * 32 : 1];
__shared__ __align__(16) T mmt_xs[mmt::UseXs<BITS, BM>::value ? mmt::XsTile<BM, KU>::ELEMS : 8];
extern __shared__ __align__(16) uint4 mmt_ws[];
const mmt::SortedRoute<E, BM * MC> route{ids, int(ids_shape[0])};
mmt::qmm_impl<T, BITS, GS, K, N, E, X_DIV, BM, FN, WN, WK, MC, KU, false, PF, WS>(
    x, w, scales, biases, w, scales, biases, route, y, mmt_red, mmt_xs, mmt_ws);
