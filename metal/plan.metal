// plan (the routing plan of the reuse kernels, one dispatch): order[r] = the pair at sorted row r
// (pairs grouped by expert), offsets[e] = first sorted row of expert e, offsets[E] = valid pairs.
// Body of mx.fast.metal_kernel. Input: idx (P,) int32. Template: E. Launch: ONE threadgroup of
// NT threads (grid == threadgroup): a counting sort with threadgroup atomic counters replaces
// argsort + scatter-add + cumsum. Pairs of one expert land in arbitrary order (atomics): every
// row is computed independently, so the op's output does not depend on it. Ids outside [0, E)
// go to a last bucket after offsets[E], so `order` is always a full permutation.
threadgroup atomic_int mmt_cnt[E + 1];
const int P = int(idx_shape[0]);
const int tid = int(thread_position_in_threadgroup.x), nt = int(threads_per_threadgroup.x);
for (int e = tid; e <= E; e += nt) atomic_store_explicit(&mmt_cnt[e], 0, memory_order_relaxed);
threadgroup_barrier(mem_flags::mem_threadgroup);
for (int p = tid; p < P; p += nt) {
  const int id = idx[p];
  atomic_fetch_add_explicit(&mmt_cnt[(id >= 0 && id < E) ? id : E], 1, memory_order_relaxed);
}
threadgroup_barrier(mem_flags::mem_threadgroup);
if (simdgroup_index_in_threadgroup == 0) {  // exclusive scan of the E+1 counts by simdgroup 0
  const int lane = int(thread_index_in_simdgroup);
  constexpr int CH = (E + 1 + 31) / 32;
  const int e0 = lane * CH;
  int s = 0;
  for (int e = e0; e < e0 + CH && e <= E; ++e) s += atomic_load_explicit(&mmt_cnt[e], memory_order_relaxed);
  int run = simd_prefix_exclusive_sum(s);
  for (int e = e0; e < e0 + CH && e <= E; ++e) {
    const int c = atomic_load_explicit(&mmt_cnt[e], memory_order_relaxed);
    offsets[e] = run;
    atomic_store_explicit(&mmt_cnt[e], run, memory_order_relaxed);  // next free row of bucket e
    run += c;
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
for (int p = tid; p < P; p += nt) {
  const int id = idx[p];
  order[atomic_fetch_add_explicit(&mmt_cnt[(id >= 0 && id < E) ? id : E], 1, memory_order_relaxed)] = p;
}
