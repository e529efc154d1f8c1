// plan (the routing plan of the reuse kernels, one launch): order[r] = the pair at sorted row r
// (pairs grouped by expert), offsets[e] = first sorted row of expert e, offsets[E] = valid pairs.
// Body of mx.fast.cuda_kernel. Input: idx (P,) int32. Template: E. Launch: ONE block of NT
// threads (grid == block; kernels/plan.py): a counting sort with
// shared-memory counters replaces argsort + scatter-add + cumsum (4+ launches, ~50-100 us on the
// H100: sweeps/results/h100/op-overhead/). Pairs of one expert land in arbitrary order (atomics):
// every row is computed independently, so the op's output does not depend on it. Ids outside
// [0, E) go to a last bucket after offsets[E], so `order` is always a full permutation.
__shared__ int mmt_cnt[E + 1];
const int P = int(idx_shape[0]);
const int tid = int(threadIdx.x), nt = int(blockDim.x);
for (int e = tid; e <= E; e += nt) mmt_cnt[e] = 0;
__syncthreads();
for (int p = tid; p < P; p += nt) {
  const int id = idx[p];
  atomicAdd(&mmt_cnt[(id >= 0 && id < E) ? id : E], 1);
}
__syncthreads();
if (tid < 32) {  // exclusive scan of the E+1 counts by warp 0: lane l owns CH consecutive buckets
  constexpr int CH = (E + 1 + 31) / 32;
  const int e0 = tid * CH;
  int s = 0;
  for (int e = e0; e < e0 + CH && e <= E; ++e) s += mmt_cnt[e];
  int incl = s;
  for (int d = 1; d < 32; d <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, incl, d);
    if (tid >= d) incl += v;
  }
  int run = incl - s;
  for (int e = e0; e < e0 + CH && e <= E; ++e) {
    const int c = mmt_cnt[e];
    offsets[e] = run;
    mmt_cnt[e] = run;  // from here on: the next free row of bucket e
    run += c;
  }
}
__syncthreads();
for (int p = tid; p < P; p += nt) {
  const int id = idx[p];
  order[atomicAdd(&mmt_cnt[(id >= 0 && id < E) ? id : E], 1)] = p;
}
