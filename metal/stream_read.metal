// Bandwidth probe: stream-read `a` once with 128-bit loads, 4 in flight per thread.
// Each thread xor-folds what it read into out[tid] so the loads cannot be optimized away.
const device uint4* p = reinterpret_cast<const device uint4*>(a);
const uint n = uint(a_shape[0]) / 4;
const uint tid = thread_position_in_grid.x;
const uint stride = threads_per_grid.x;
uint acc = 0;
uint i = tid;
for (; i + 3 * stride < n; i += 4 * stride) {
  uint4 v0 = p[i], v1 = p[i + stride], v2 = p[i + 2 * stride], v3 = p[i + 3 * stride];
  acc ^= v0.x ^ v0.y ^ v0.z ^ v0.w ^ v1.x ^ v1.y ^ v1.z ^ v1.w;
  acc ^= v2.x ^ v2.y ^ v2.z ^ v2.w ^ v3.x ^ v3.y ^ v3.z ^ v3.w;
}
for (; i < n; i += stride) {
  uint4 v = p[i];
  acc ^= v.x ^ v.y ^ v.z ^ v.w;
}
out[tid] = acc;
