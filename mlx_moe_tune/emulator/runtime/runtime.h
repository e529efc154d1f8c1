// mlx-moe-tune SIMT emulator runtime: fibers, threadgroup scheduler, barriers, SIMD-group
// collectives, threadgroup memory arena, check-mode hooks, 16-bit float types.
//
// One translation unit = this header + metal_shim.h or cuda_shim.h + the user header + the
// generated kernel + the generated launcher (see mlx_moe_tune/emulator/kernel.py). Every GPU
// thread of a threadgroup is a cooperative fiber on its own stack; the fibers of one group run
// on one OS thread in a deterministic order and switch only at barriers, SIMD-group collectives
// and thread exit. Groups are spread over worker OS threads, one group per worker at a time.
//
// The current fiber is found without TLS: fiber stacks are kStack-aligned slots whose lowest
// page holds the Fiber header, so `sp & ~(kStack-1)` is the header of the running fiber.
#pragma once

#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#define MMT_EMU_NOSAN __attribute__((no_sanitize_thread))
#define MMT_EMU_RT __attribute__((no_sanitize_thread, noinline))
#define MMT_EMU_INLINE __attribute__((always_inline)) inline

namespace mmt_emu {

// ------------------------------------------------------------------------------------------
// context switch: save callee-saved registers on the current stack, store sp, load the new sp,
// restore, return into the other fiber. New fibers "return" into fiber_entry.
// ------------------------------------------------------------------------------------------
extern "C" void mmt_emu_ctx_switch(void** save_sp, void* new_sp);

#if defined(__x86_64__)
asm(R"(
.text
.p2align 4
.local mmt_emu_ctx_switch
.type mmt_emu_ctx_switch,@function
mmt_emu_ctx_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size mmt_emu_ctx_switch,.-mmt_emu_ctx_switch
)");
constexpr int kCtxWords = 6;  // saved registers
MMT_EMU_INLINE uintptr_t current_sp() {
  uintptr_t sp;
  asm("movq %%rsp, %0" : "=r"(sp));
  return sp;
}
#elif defined(__aarch64__)
asm(R"(
.text
.p2align 4
.local mmt_emu_ctx_switch
.type mmt_emu_ctx_switch,%function
mmt_emu_ctx_switch:
  sub sp, sp, #176
  stp x19, x20, [sp, #0]
  stp x21, x22, [sp, #16]
  stp x23, x24, [sp, #32]
  stp x25, x26, [sp, #48]
  stp x27, x28, [sp, #64]
  stp x29, x30, [sp, #80]
  stp d8, d9, [sp, #96]
  stp d10, d11, [sp, #112]
  stp d12, d13, [sp, #128]
  stp d14, d15, [sp, #144]
  mov x2, sp
  str x2, [x0]
  mov sp, x1
  ldp x19, x20, [sp, #0]
  ldp x21, x22, [sp, #16]
  ldp x23, x24, [sp, #32]
  ldp x25, x26, [sp, #48]
  ldp x27, x28, [sp, #64]
  ldp x29, x30, [sp, #80]
  ldp d8, d9, [sp, #96]
  ldp d10, d11, [sp, #112]
  ldp d12, d13, [sp, #128]
  ldp d14, d15, [sp, #144]
  add sp, sp, #176
  ret
.size mmt_emu_ctx_switch,.-mmt_emu_ctx_switch
)");
MMT_EMU_INLINE uintptr_t current_sp() {
  uintptr_t sp;
  asm("mov %0, sp" : "=r"(sp));
  return sp;
}
#else
#error "mlx-moe-tune emulator: only x86-64 and aarch64 hosts are supported"
#endif

constexpr size_t kStack = size_t(1) << 18;  // slot per fiber (header + guard + stack), aligned
constexpr size_t kHeader = 16384;           // Fiber header area at the slot's low end
constexpr size_t kPage = 4096;
constexpr int kSimd = 32;
constexpr int kMaxAsync = 128;  // cp.async copies in flight per thread
constexpr int kMaxSites = 256;  // threadgroup declarations per kernel

enum State : uint8_t { RUNNABLE = 0, WAIT_SIMD = 1, WAIT_BAR = 2, DONE = 3 };

struct Fiber;
struct Group;
using Resolver = void (*)(Fiber** lanes, Group* g);

struct CollPost {
  Resolver resolve;
  void* args;
  const void* site;
  uint32_t mask;  // CUDA *_sync mask; 0 = Metal (active lanes = lanes at the same site)
  const char* what;
};

struct AsyncCopy {
  void* dst;
  const void* src;
  uint32_t bytes;  // bytes read from src; the rest of `size` is zero-filled
  uint32_t size;
  uint64_t group;
};

struct Buffer {
  char* lo;
  char* hi;
  const char* name;
  int elem;
};

struct Launch;

struct Fiber {
  void* sp;
  Group* g;
  uint32_t linear, lane, sg;
  uint32_t tid[3];
  State state;
  CollPost coll;
  const void* bar_site;
  int ncp;
  uint64_t cp_next_group;
  AsyncCopy cp[kMaxAsync];
};
static_assert(sizeof(Fiber) < kHeader, "fiber header too large");

MMT_EMU_INLINE Fiber* cur_fiber() {
  return reinterpret_cast<Fiber*>(current_sp() & ~(uintptr_t)(kStack - 1));
}

struct Shadow {  // check mode: per byte of threadgroup memory
  uint32_t w_epoch, r_epoch, w_stamp, r_stamp;
  uint16_t w_tid, r_tid, r_sg;
  uint8_t r_multi, pad;
};

struct Group {
  Launch* L;
  Fiber** fibers;
  int n, nsg;
  uint32_t pos[3], size[3];
  long index;
  int live, at_bar;
  int sg_runnable[32];
  int sg_waiting[32];
  void* sched_sp;
  // threadgroup memory
  char* arena;
  size_t arena_cap, arena_used;
  const void* site_key[kMaxSites];
  size_t site_off[kMaxSites];
  int nsites;
  // check mode
  uint32_t epoch, start_epoch;
  uint32_t stamp_counter;
  uint32_t sg_stamp[32];
  Shadow* shadow;
  // result
  bool failed;
  char err[4096];
};

struct Launch {
  void** bufs;
  Buffer* buffers;
  int nbufs;
  uint32_t groups[3];  // threadgroups per grid
  uint32_t tg[3];      // full threadgroup size
  uint32_t grid[3];    // threads per grid (Metal) / blocks*tg (CUDA)
  int partial;         // Metal: last threadgroups are partial
  int check;
  size_t dyn_smem;
  size_t tg_limit;       // max bytes of threadgroup memory (0: none)
  const char* tg_limit_what;
  const char* kernel_name;
  int dialect;  // 0 metal, 1 cuda
  void (*entry)(Fiber*);
  std::atomic<long> next;
  std::atomic<bool> stop;
  std::mutex mu;
  long err_group;
  char err[4096];
};

extern "C" MMT_EMU_NOSAN inline int& mmt_emu_check_active() {
  static int active = 0;
  return active;
}
// address range of all fiber stack regions: instrumented code outside fibers (std:: helpers in
// the launcher) must not be treated as kernel accesses
MMT_EMU_NOSAN inline uintptr_t* stack_range() {
  static uintptr_t r[2] = {~uintptr_t(0), 0};
  return r;
}
MMT_EMU_INLINE bool on_fiber() {
  const uintptr_t sp = current_sp();
  const uintptr_t* r = stack_range();
  return sp >= r[0] && sp < r[1];
}

// ------------------------------------------------------------------------------------------
// errors: a fiber that fails records the message and switches back to the scheduler for good
// ------------------------------------------------------------------------------------------
MMT_EMU_RT [[noreturn]] void fail_in(Fiber* f, const char* fmt, ...);

MMT_EMU_RT inline void describe_thread(Fiber* f, char* out, size_t n) {
  Group* g = f->g;
  Launch* L = g->L;
  if (L->dialect == 0) {
    snprintf(out, n, "thread_position_in_grid=(%u,%u,%u) threadgroup=(%u,%u,%u) tid=%u",
             g->pos[0] * L->tg[0] + f->tid[0], g->pos[1] * L->tg[1] + f->tid[1],
             g->pos[2] * L->tg[2] + f->tid[2], g->pos[0], g->pos[1], g->pos[2], f->linear);
  } else {
    snprintf(out, n, "blockIdx=(%u,%u,%u) threadIdx=(%u,%u,%u)", g->pos[0], g->pos[1], g->pos[2],
             f->tid[0], f->tid[1], f->tid[2]);
  }
}

MMT_EMU_RT [[noreturn]] inline void fail_in(Fiber* f, const char* fmt, ...) {
  Group* g = f->g;
  char thr[256];
  describe_thread(f, thr, sizeof thr);
  char msg[3000];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  snprintf(g->err, sizeof g->err, "kernel %s, %s: %s", g->L->kernel_name, thr, msg);
  g->failed = true;
  f->state = DONE;
  void* dummy;
  mmt_emu_ctx_switch(&dummy, g->sched_sp);
  __builtin_unreachable();
}

// ------------------------------------------------------------------------------------------
// scheduling
// ------------------------------------------------------------------------------------------
MMT_EMU_RT inline Fiber* find_runnable(Group* g, Fiber* f) {
  const int n = g->n;
  // same simdgroup first (cyclic after f), then the following simdgroups
  const int base = int(f->sg) * kSimd;
  const int end = std::min(base + kSimd, n);
  for (int i = int(f->linear) + 1; i < end; i++)
    if (g->fibers[i]->state == RUNNABLE) return g->fibers[i];
  for (int i = base; i <= int(f->linear) && i < end; i++)
    if (g->fibers[i]->state == RUNNABLE) return g->fibers[i];
  for (int k = 1; k < g->nsg; k++) {
    const int s = (int(f->sg) + k) % g->nsg;
    if (g->sg_runnable[s] == 0) continue;
    const int b = s * kSimd, e = std::min(b + kSimd, n);
    for (int i = b; i < e; i++)
      if (g->fibers[i]->state == RUNNABLE) return g->fibers[i];
  }
  return nullptr;
}

MMT_EMU_RT inline void set_runnable(Group* g, Fiber* f) {
  if (f->state == WAIT_SIMD) g->sg_waiting[f->sg]--;
  if (f->state == WAIT_BAR) g->at_bar--;
  f->state = RUNNABLE;
  g->sg_runnable[f->sg]++;
}

MMT_EMU_RT inline void sg_sync_stamp(Group* g, int s) { g->sg_stamp[s] = ++g->stamp_counter; }

// Resolve the waiting collectives of simdgroup s (no lane of s is runnable).
MMT_EMU_RT inline void resolve_sg(Group* g, int s, Fiber* cur) {
  const int b = s * kSimd, e = std::min(b + kSimd, g->n);
  Fiber* lanes[kSimd];
  bool done[kSimd] = {};
  int groups = 0;
  for (int i = b; i < e; i++) {
    Fiber* f = g->fibers[i];
    if (f->state != WAIT_SIMD || done[i - b]) continue;
    for (int k = 0; k < kSimd; k++) lanes[k] = nullptr;
    if (f->coll.mask != 0) {  // CUDA: exactly the lanes named in the mask
      const uint32_t mask = f->coll.mask;
      if (!((mask >> f->lane) & 1u))
        fail_in(f, "%s: calling lane %u is not in mask 0x%08x", f->coll.what, f->lane, mask);
      bool ready = true;
      for (int k = 0; k < kSimd && ready; k++) {
        if (!((mask >> k) & 1u)) continue;
        if (b + k >= g->n) fail_in(f, "%s: mask 0x%08x names lane %d, which does not exist", f->coll.what, mask, k);
        Fiber* o = g->fibers[b + k];
        if (o->state == DONE)
          fail_in(f, "%s: mask 0x%08x names lane %d, which has exited", f->coll.what, mask, k);
        if (o->state != WAIT_SIMD || done[k] || o->coll.mask != mask || o->coll.resolve != f->coll.resolve)
          ready = false;  // that lane may still arrive (deadlock detection catches it if not)
      }
      if (!ready) continue;
      for (int k = 0; k < kSimd; k++)
        if ((mask >> k) & 1u) {
          lanes[k] = g->fibers[b + k];
          done[k] = true;
        }
    } else {
      for (int i2 = i; i2 < e; i2++) {
        Fiber* o = g->fibers[i2];
        // Lanes are matched by operation, not by code address: the optimizer duplicates code
        // paths, so one source-level collective may run from several call instructions.
        if (o->state == WAIT_SIMD && !done[i2 - b] && o->coll.mask == 0 && o->coll.resolve == f->coll.resolve) {
          lanes[i2 - b] = o;
          done[i2 - b] = true;
        }
      }
    }
    groups++;
    if (groups > 1 && g->L->check && f->coll.mask == 0)
      fail_in(f, "divergent SIMD-group collectives: lanes of simdgroup %d wait in different collective "
                 "operations at once (%s and another); reconvergence order is not modeled", s, f->coll.what);
    f->coll.resolve(lanes, g);
    for (int k = 0; k < kSimd; k++)
      if (lanes[k]) set_runnable(g, lanes[k]);
  }
  sg_sync_stamp(g, s);
  (void)cur;
}

MMT_EMU_RT inline void release_barrier(Group* g, Fiber* cur) {
  if (g->live != g->n) {
    // some threads exited while the others wait at a barrier
    for (int i = 0; i < g->n; i++)
      if (g->fibers[i]->state == DONE) {
        char thr[256];
        describe_thread(g->fibers[i], thr, sizeof thr);
        fail_in(cur, "divergent barrier: %d of %d threads wait at a barrier that thread [%s] never reaches (it returned)",
                g->at_bar, g->n, thr);
      }
  }
  if (g->L->check) {
    const void* site = g->fibers[0]->bar_site;
    for (int i = 1; i < g->n; i++)
      if (g->fibers[i]->bar_site != site) {
        char thr[256];
        describe_thread(g->fibers[i], thr, sizeof thr);
        fail_in(cur, "divergent barrier: threads of one group wait at different barriers "
                     "(thread 0 at line %d, thread [%s] at line %d of the generated source)",
                (int)(uintptr_t)site, thr, (int)(uintptr_t)g->fibers[i]->bar_site);
      }
  }
  for (int i = 0; i < g->n; i++) set_runnable(g, g->fibers[i]);
  g->at_bar = 0;
  g->epoch++;
}

// f has just blocked (WAIT_SIMD / WAIT_BAR) or finished (DONE): run whatever can run next.
MMT_EMU_RT inline void schedule_from(Fiber* f) {
  Group* g = f->g;
  const int s = int(f->sg);
  if (g->sg_runnable[s] == 0 && g->sg_waiting[s] > 0) resolve_sg(g, s, f);
  if (g->at_bar > 0 && g->at_bar == g->live) release_barrier(g, f);
  if (f->state == RUNNABLE) return;
  Fiber* nx = find_runnable(g, f);
  if (nx == nullptr) {
    if (g->live == 0) {
      void* dummy;
      mmt_emu_ctx_switch(&dummy, g->sched_sp);
      __builtin_unreachable();
    }
    // nothing can run: some simdgroup has lanes blocked in a collective that cannot complete
    for (int s2 = 0; s2 < g->nsg; s2++)
      if (g->sg_waiting[s2] > 0) {
        const int b2 = s2 * kSimd;
        for (int i = b2; i < std::min(g->n, b2 + kSimd); i++) {
          Fiber* w = g->fibers[i];
          if (w->state != WAIT_SIMD) continue;
          for (int k = 0; k < kSimd && w->coll.mask; k++) {
            if (!((w->coll.mask >> k) & 1u)) continue;
            Fiber* o = g->fibers[b2 + k];
            if (o->state == WAIT_BAR)
              fail_in(w, "deadlock: %s with mask 0x%08x waits for lane %d, which waits at a barrier",
                      w->coll.what, w->coll.mask, k);
            if (o->state == WAIT_SIMD && (o->coll.mask != w->coll.mask || o->coll.resolve != w->coll.resolve))
              fail_in(w, "deadlock: %s with mask 0x%08x waits for lane %d, which is in another warp collective "
                         "(%s, mask 0x%08x)", w->coll.what, w->coll.mask, k, o->coll.what, o->coll.mask);
          }
          fail_in(w, "deadlock in %s: %d threads wait at a barrier, %d exited", w->coll.what, g->at_bar,
                  g->n - g->live);
        }
      }
    fail_in(f, "deadlock: %d threads wait at a barrier, %d exited", g->at_bar, g->n - g->live);
  }
  mmt_emu_ctx_switch(&f->sp, nx->sp);
}

// A SIMD-group / warp collective: post args, wait until the lanes are resolved.
MMT_EMU_RT inline void collective(Resolver r, void* args, uint32_t mask, const void* site, const char* what) {
  Fiber* f = cur_fiber();
  Group* g = f->g;
  f->coll.resolve = r;
  f->coll.args = args;
  f->coll.mask = mask;
  f->coll.site = site;
  f->coll.what = what;
  f->state = WAIT_SIMD;
  g->sg_runnable[f->sg]--;
  g->sg_waiting[f->sg]++;
  schedule_from(f);
}

MMT_EMU_RT inline void barrier_at(const void* site) {
  Fiber* f = cur_fiber();
  Group* g = f->g;
  f->bar_site = site;
  f->state = WAIT_BAR;
  g->at_bar++;
  g->sg_runnable[f->sg]--;
  schedule_from(f);
}

// ------------------------------------------------------------------------------------------
// threadgroup memory: one arena per group; each declaration site gets one slot per group
// ------------------------------------------------------------------------------------------
MMT_EMU_RT inline void* tg_alloc_raw(const void* site, size_t bytes, size_t align) {
  Fiber* f = cur_fiber();
  Group* g = f->g;
  for (int i = 0; i < g->nsites; i++)
    if (g->site_key[i] == site) return g->arena + g->site_off[i];
  if (g->nsites == kMaxSites) fail_in(f, "too many threadgroup/__shared__ declarations");
  if (align < 16) align = 16;
  size_t off = (g->arena_used + align - 1) & ~(align - 1);
  if (off + bytes > g->arena_cap)
    fail_in(f, "threadgroup/shared memory: %zu bytes requested, the emulator's arena holds %zu", off + bytes, g->arena_cap);
  const size_t limit = g->L->tg_limit;
  if (limit && off + bytes > limit)
    fail_in(f, "threadgroup/shared memory use %zu bytes exceeds the %s limit of %zu bytes", off + bytes,
            g->L->tg_limit_what, limit);
  g->site_key[g->nsites] = site;
  g->site_off[g->nsites] = off;
  g->nsites++;
  g->arena_used = off + bytes;
  return g->arena + off;
}

template <class A>
MMT_EMU_INLINE A* tg_alloc(const void* site) {
  return reinterpret_cast<A*>(tg_alloc_raw(site, sizeof(A), alignof(A)));
}

MMT_EMU_INLINE void* dyn_smem() { return cur_fiber()->g->arena; }

// ------------------------------------------------------------------------------------------
// check mode: access hooks (compiled with -fsanitize=thread, whose calls land here)
// ------------------------------------------------------------------------------------------
MMT_EMU_RT [[noreturn]] inline void report_oob(Fiber* f, const Buffer& b, const char* addr, size_t size, bool write) {
  const long long off = (long long)(addr - b.lo);
  const long long idx = off >= 0 ? off / b.elem : -((-off + b.elem - 1) / b.elem);
  fail_in(f, "out-of-bounds %s of buffer '%s' at element index %lld (%zu-byte access at byte offset %lld; "
             "buffer has %lld elements)",
          write ? "write" : "read", b.name, idx, size, off, (long long)((b.hi - b.lo) / b.elem));
}

MMT_EMU_RT inline void shadow_access(Fiber* f, const char* a, size_t size, bool write) {
  Group* g = f->g;
  const size_t off = size_t(a - g->arena);
  if (off + size > g->arena_used)
    fail_in(f, "out-of-bounds %s of threadgroup memory at byte offset %zu (%zu bytes allocated)",
            write ? "write" : "read", off, g->arena_used);
  const uint32_t E = g->epoch;
  const uint16_t t = uint16_t(f->linear);
  const uint16_t sg = uint16_t(f->sg);
  const uint32_t st = g->sg_stamp[sg];
  for (size_t i = 0; i < size; i++) {
    Shadow& sh = g->shadow[off + i];
    if (sh.w_epoch == E && sh.w_tid != t) {
      const bool synced = (sh.w_tid / kSimd == sg) && sh.w_stamp != st;
      if (!synced)
        fail_in(f, "threadgroup memory race: %s of byte offset %zu after a write by thread %u with no barrier in between",
                write ? "write" : "read", off + i, sh.w_tid);
    }
    if (write) {
      if (sh.r_epoch == E) {
        bool race = false;
        unsigned other = sh.r_tid;
        if (sh.r_multi) {
          race = !(sh.r_sg == sg && sh.r_stamp != st);
        } else if (sh.r_tid != t) {
          race = !((sh.r_tid / kSimd == sg) && sh.r_stamp != st);
        }
        if (race)
          fail_in(f, "threadgroup memory race: write of byte offset %zu after a read by thread %u%s with no barrier in between",
                  off + i, other, sh.r_multi ? " (and others)" : "");
      }
      sh.w_epoch = E;
      sh.w_tid = t;
      sh.w_stamp = st;
    } else {
      if (sh.r_epoch != E) {
        sh.r_epoch = E;
        sh.r_tid = t;
        sh.r_multi = 0;
        sh.r_sg = sg;
        sh.r_stamp = st;
      } else if (sh.r_tid != t || sh.r_multi) {
        if (sh.r_tid != t) sh.r_multi = 1;
        if (sh.r_sg != sg) sh.r_sg = 0xffff;
        sh.r_stamp = st;
      }
    }
  }
}

MMT_EMU_RT inline void check_access(const void* addr, size_t size, bool write, bool atomic = false) {
  if (!mmt_emu_check_active() || !on_fiber()) return;
  Fiber* f = cur_fiber();
  Group* g = f->g;
  if (!g->L->check) return;  // the flag is process-wide; this launch may be a fast one
  const char* a = static_cast<const char*>(addr);
  if (a >= g->arena && a < g->arena + g->arena_cap) {
    if (atomic) {  // atomics are never races: bounds only
      const size_t off = size_t(a - g->arena);
      if (off + size > g->arena_used)
        fail_in(f, "out-of-bounds atomic on threadgroup memory at byte offset %zu (%zu bytes allocated)", off, g->arena_used);
    } else {
      shadow_access(f, a, size, write);
    }
    return;
  }
  Launch* L = g->L;
  for (int i = 0; i < L->nbufs; i++) {
    const Buffer& b = L->buffers[i];
    if (a + size > b.lo - kPage && a < b.hi + kPage) {
      if (a < b.lo || a + size > b.hi) report_oob(f, b, a, size, write);
      return;
    }
  }
}

}  // namespace mmt_emu

extern "C" {
#define MMT_EMU_TSAN_RW(N)                                                                     \
  MMT_EMU_RT void __tsan_read##N(void* a) { mmt_emu::check_access(a, N, false); }               \
  MMT_EMU_RT void __tsan_write##N(void* a) { mmt_emu::check_access(a, N, true); }               \
  MMT_EMU_RT void __tsan_unaligned_read##N(void* a) { mmt_emu::check_access(a, N, false); }     \
  MMT_EMU_RT void __tsan_unaligned_write##N(void* a) { mmt_emu::check_access(a, N, true); }     \
  MMT_EMU_RT void __tsan_volatile_read##N(void* a) { mmt_emu::check_access(a, N, false); }      \
  MMT_EMU_RT void __tsan_volatile_write##N(void* a) { mmt_emu::check_access(a, N, true); }      \
  MMT_EMU_RT void __tsan_unaligned_volatile_read##N(void* a) { mmt_emu::check_access(a, N, false); } \
  MMT_EMU_RT void __tsan_unaligned_volatile_write##N(void* a) { mmt_emu::check_access(a, N, true); }
MMT_EMU_TSAN_RW(1)
MMT_EMU_TSAN_RW(2)
MMT_EMU_TSAN_RW(4)
MMT_EMU_TSAN_RW(8)
MMT_EMU_TSAN_RW(16)
#undef MMT_EMU_TSAN_RW
MMT_EMU_RT void __tsan_read_range(void* a, unsigned long n) { mmt_emu::check_access(a, n, false); }
MMT_EMU_RT void __tsan_write_range(void* a, unsigned long n) { mmt_emu::check_access(a, n, true); }
// atomics in instrumented code (std::atomic, static-local guards): plain seq_cst atomics
#define MMT_EMU_TSAN_ATOMIC(N, T)                                                                          \
  MMT_EMU_RT T __tsan_atomic##N##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); } \
  MMT_EMU_RT void __tsan_atomic##N##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); } \
  MMT_EMU_RT T __tsan_atomic##N##_exchange(volatile T* a, T v, int) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); } \
  MMT_EMU_RT T __tsan_atomic##N##_fetch_add(volatile T* a, T v, int) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); } \
  MMT_EMU_RT T __tsan_atomic##N##_fetch_sub(volatile T* a, T v, int) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); } \
  MMT_EMU_RT T __tsan_atomic##N##_fetch_and(volatile T* a, T v, int) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); } \
  MMT_EMU_RT T __tsan_atomic##N##_fetch_or(volatile T* a, T v, int) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); } \
  MMT_EMU_RT T __tsan_atomic##N##_fetch_xor(volatile T* a, T v, int) { return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); } \
  MMT_EMU_RT T __tsan_atomic##N##_fetch_nand(volatile T* a, T v, int) { return __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST); } \
  MMT_EMU_RT int __tsan_atomic##N##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {             \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); }                \
  MMT_EMU_RT int __tsan_atomic##N##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {               \
    return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); }                 \
  MMT_EMU_RT T __tsan_atomic##N##_compare_exchange_val(volatile T* a, T c, T v, int, int) {                   \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); return c; }
MMT_EMU_TSAN_ATOMIC(8, uint8_t)
MMT_EMU_TSAN_ATOMIC(16, uint16_t)
MMT_EMU_TSAN_ATOMIC(32, uint32_t)
MMT_EMU_TSAN_ATOMIC(64, uint64_t)
#undef MMT_EMU_TSAN_ATOMIC
MMT_EMU_RT void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
MMT_EMU_RT void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
MMT_EMU_RT void __tsan_init() {}
MMT_EMU_RT void __tsan_func_entry(void*) {}
MMT_EMU_RT void __tsan_func_exit() {}
MMT_EMU_RT void __tsan_vptr_update(void**, void*) {}
MMT_EMU_RT void __tsan_vptr_read(void**) {}
}

namespace mmt_emu {

// Explicit hooks for runtime functions that touch memory on a thread's behalf (ldmatrix,
// simdgroup_load, cp.async completion, atomics): no-ops outside check mode.
MMT_EMU_INLINE void note_read(const void* a, size_t n) {
  if (mmt_emu_check_active()) check_access(a, n, false);
}
MMT_EMU_INLINE void note_write(const void* a, size_t n) {
  if (mmt_emu_check_active()) check_access(a, n, true);
}
MMT_EMU_INLINE void note_atomic(const void* a, size_t n) {
  if (mmt_emu_check_active()) check_access(a, n, true, true);
}
MMT_EMU_RT inline void note_access_as(Fiber* f, const void* addr, size_t size, bool write) {
  // like check_access, but on behalf of fiber f (used by resolvers running on another lane)
  if (!mmt_emu_check_active()) return;
  Group* g = f->g;
  if (!g->L->check) return;
  const char* a = static_cast<const char*>(addr);
  if (a >= g->arena && a < g->arena + g->arena_cap) {
    shadow_access(f, a, size, write);
    return;
  }
  Launch* L = g->L;
  for (int i = 0; i < L->nbufs; i++) {
    const Buffer& b = L->buffers[i];
    if (a + size > b.lo - kPage && a < b.hi + kPage) {
      if (a < b.lo || a + size > b.hi) report_oob(f, b, a, size, write);
      return;
    }
  }
}

// ------------------------------------------------------------------------------------------
// 16-bit floats: IEEE half (K=0) and bfloat16 (K=1); arithmetic in float, rounded back (RNE)
// ------------------------------------------------------------------------------------------
MMT_EMU_INLINE constexpr uint16_t f32_to_f16_bits(float f) {
  const uint32_t x = __builtin_bit_cast(uint32_t, f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return uint16_t(sign | 0x7c00u | (ax > 0x7f800000u ? (0x200u | ((ax >> 13) & 0x3ffu)) : 0u));
  if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u);
  if (ax < 0x38800000u) {  // below 2^-14: subnormal half (exact scaling, then RNE to integer)
    const float af = __builtin_bit_cast(float, ax) * 16777216.0f;
    uint32_t m = uint32_t(af);
    const float rem = af - float(m);
    if (rem > 0.5f || (rem == 0.5f && (m & 1u))) m++;
    return uint16_t(sign | m);
  }
  uint32_t h = (((ax >> 23) - 112u) << 10) | ((ax >> 13) & 0x3ffu);
  const uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;
  return uint16_t(sign | h);
}
MMT_EMU_INLINE constexpr float f16_bits_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {
    const float v = float(m) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  if (e == 31) return __builtin_bit_cast(float, sign | 0x7f800000u | (m << 13));
  return __builtin_bit_cast(float, sign | ((e + 112u) << 23) | (m << 13));
}
MMT_EMU_INLINE constexpr uint16_t f32_to_bf16_bits(float f) {
  const uint32_t x = __builtin_bit_cast(uint32_t, f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x40u);
  return uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
MMT_EMU_INLINE constexpr float bf16_bits_to_f32(uint16_t b) {
  return __builtin_bit_cast(float, uint32_t(b) << 16);
}

template <int K>
struct F16 {
  uint16_t bits;
  F16() = default;
  template <class U, std::enable_if_t<std::is_arithmetic_v<U>, int> = 0>
  MMT_EMU_INLINE constexpr F16(U v) : bits(K == 0 ? f32_to_f16_bits(float(v)) : f32_to_bf16_bits(float(v))) {}
  MMT_EMU_INLINE constexpr F16(F16<1 - K> o) : F16(float(o)) {}
  MMT_EMU_INLINE constexpr operator float() const { return K == 0 ? f16_bits_to_f32(bits) : bf16_bits_to_f32(bits); }
  static MMT_EMU_INLINE constexpr F16 from_bits(uint16_t b) {
    F16 r{};
    r.bits = b;
    return r;
  }
  MMT_EMU_INLINE constexpr F16 operator-() const { return from_bits(uint16_t(bits ^ 0x8000u)); }
  MMT_EMU_INLINE constexpr F16 operator+() const { return *this; }
  template <class U>
  MMT_EMU_INLINE F16& operator+=(U o) { return *this = F16(float(*this) + float(o)); }
  template <class U>
  MMT_EMU_INLINE F16& operator-=(U o) { return *this = F16(float(*this) - float(o)); }
  template <class U>
  MMT_EMU_INLINE F16& operator*=(U o) { return *this = F16(float(*this) * float(o)); }
  template <class U>
  MMT_EMU_INLINE F16& operator/=(U o) { return *this = F16(float(*this) / float(o)); }
  MMT_EMU_INLINE F16& operator++() { return *this += 1.0f; }
  MMT_EMU_INLINE F16& operator--() { return *this -= 1.0f; }
};
using half_t = F16<0>;
using bf16_t = F16<1>;

template <class T>
struct is_f16 : std::false_type {};
template <int K>
struct is_f16<F16<K>> : std::true_type {};

#define MMT_EMU_F16_ARITH(OP)                                                                   \
  template <int K>                                                                              \
  MMT_EMU_INLINE F16<K> operator OP(F16<K> a, F16<K> b) { return F16<K>(float(a) OP float(b)); } \
  MMT_EMU_INLINE float operator OP(F16<0> a, F16<1> b) { return float(a) OP float(b); }          \
  MMT_EMU_INLINE float operator OP(F16<1> a, F16<0> b) { return float(a) OP float(b); }          \
  template <int K, class U, std::enable_if_t<std::is_integral_v<U>, int> = 0>                   \
  MMT_EMU_INLINE F16<K> operator OP(F16<K> a, U b) { return F16<K>(float(a) OP float(b)); }     \
  template <int K, class U, std::enable_if_t<std::is_integral_v<U>, int> = 0>                   \
  MMT_EMU_INLINE F16<K> operator OP(U a, F16<K> b) { return F16<K>(float(a) OP float(b)); }     \
  template <int K, class U, std::enable_if_t<std::is_floating_point_v<U>, int> = 0>             \
  MMT_EMU_INLINE U operator OP(F16<K> a, U b) { return U(float(a)) OP b; }                      \
  template <int K, class U, std::enable_if_t<std::is_floating_point_v<U>, int> = 0>             \
  MMT_EMU_INLINE U operator OP(U a, F16<K> b) { return a OP U(float(b)); }
MMT_EMU_F16_ARITH(+)
MMT_EMU_F16_ARITH(-)
MMT_EMU_F16_ARITH(*)
MMT_EMU_F16_ARITH(/)
#undef MMT_EMU_F16_ARITH

#define MMT_EMU_F16_CMP(OP)                                                                     \
  template <int K1, int K2>                                                                     \
  MMT_EMU_INLINE bool operator OP(F16<K1> a, F16<K2> b) { return float(a) OP float(b); }        \
  template <int K, class U, std::enable_if_t<std::is_arithmetic_v<U>, int> = 0>                 \
  MMT_EMU_INLINE bool operator OP(F16<K> a, U b) { return float(a) OP b; }                      \
  template <int K, class U, std::enable_if_t<std::is_arithmetic_v<U>, int> = 0>                 \
  MMT_EMU_INLINE bool operator OP(U a, F16<K> b) { return a OP float(b); }
MMT_EMU_F16_CMP(==)
MMT_EMU_F16_CMP(!=)
MMT_EMU_F16_CMP(<)
MMT_EMU_F16_CMP(<=)
MMT_EMU_F16_CMP(>)
MMT_EMU_F16_CMP(>=)
#undef MMT_EMU_F16_CMP

// ------------------------------------------------------------------------------------------
// generic collective resolvers
// ------------------------------------------------------------------------------------------
template <class T>
struct Arg {
  T v;
  T r;
  int p;  // lane / delta / mask parameter
  int width;
};

template <class T>
MMT_EMU_INLINE float acc_t_cvt(T v) { return float(v); }

template <class T>
using acc_of = std::conditional_t<is_f16<T>::value, float, T>;

enum ReduceOp { R_SUM, R_PROD, R_MIN, R_MAX, R_AND, R_OR, R_XOR };

template <class T, int OP>
MMT_EMU_INLINE T reduce2(T a, T b) {
  if constexpr (OP == R_SUM) return T(a + b);
  if constexpr (OP == R_PROD) return T(a * b);
  if constexpr (OP == R_MIN) return b < a ? b : a;
  if constexpr (OP == R_MAX) return a < b ? b : a;
  if constexpr (OP == R_AND) return T(a & b);
  if constexpr (OP == R_OR) return T(a | b);
  if constexpr (OP == R_XOR) return T(a ^ b);
}

// reduction over all participating lanes, in lane order (QUAD: per group of 4 lanes)
template <class T, int OP, bool QUAD>
MMT_EMU_RT void resolve_reduce(Fiber** lanes, Group*) {
  const int span = QUAD ? 4 : kSimd;
  for (int b = 0; b < kSimd; b += span) {
    bool have = false;
    T acc{};
    for (int k = b; k < b + span; k++) {
      if (!lanes[k]) continue;
      const T v = static_cast<Arg<T>*>(lanes[k]->coll.args)->v;
      acc = have ? reduce2<T, OP>(acc, v) : v;
      have = true;
    }
    for (int k = b; k < b + span; k++)
      if (lanes[k]) static_cast<Arg<T>*>(lanes[k]->coll.args)->r = acc;
  }
}

template <class T, bool INCLUSIVE, int OP, bool QUAD>
MMT_EMU_RT void resolve_scan(Fiber** lanes, Group*) {
  const int span = QUAD ? 4 : kSimd;
  for (int b = 0; b < kSimd; b += span) {
    bool have = false;
    T acc{};
    for (int k = b; k < b + span; k++) {
      if (!lanes[k]) continue;
      Arg<T>* a = static_cast<Arg<T>*>(lanes[k]->coll.args);
      const T v = a->v;
      if (INCLUSIVE) {
        acc = have ? reduce2<T, OP>(acc, v) : v;
        a->r = acc;
      } else {
        a->r = have ? acc : (OP == R_PROD ? T(1) : T(0));
        acc = have ? reduce2<T, OP>(acc, v) : v;
      }
      have = true;
    }
  }
}

// shuffles. MODE: 0 idx, 1 down, 2 up, 3 xor; METAL: out-of-range keeps own value.
// width: CUDA segment width (Metal: 32; quad ops: 4).
template <class T, int MODE>
MMT_EMU_RT void resolve_shuffle(Fiber** lanes, Group*) {
  T vals[kSimd];
  for (int k = 0; k < kSimd; k++)
    if (lanes[k]) vals[k] = static_cast<Arg<T>*>(lanes[k]->coll.args)->v;
  for (int k = 0; k < kSimd; k++) {
    if (!lanes[k]) continue;
    Arg<T>* a = static_cast<Arg<T>*>(lanes[k]->coll.args);
    const int w = a->width;
    const int seg = k & ~(w - 1);
    int src = k;
    if (MODE == 0) src = seg + (a->p & (w - 1));
    if (MODE == 0 && a->p >= kSimd && w == kSimd) src = k;  // Metal: out of range -> undefined
    if (MODE == 1) src = (k - seg) + a->p < w ? k + a->p : k;
    if (MODE == 2) src = (k - seg) - a->p >= 0 ? k - a->p : k;
    if (MODE == 3) {
      src = k ^ a->p;
      if (src >= seg + w || src < 0 || src >= kSimd) src = k;
    }
    if (MODE == 4) src = seg + ((k - seg + a->p) % w);
    if (MODE == 5) src = seg + (((k - seg - a->p) % w) + w) % w;
    a->r = lanes[src] ? vals[src] : a->v;
  }
}

template <class T>
MMT_EMU_RT void resolve_broadcast_first(Fiber** lanes, Group*) {
  int first = -1;
  for (int k = 0; k < kSimd; k++)
    if (lanes[k]) {
      first = k;
      break;
    }
  const T v = static_cast<Arg<T>*>(lanes[first]->coll.args)->v;
  for (int k = 0; k < kSimd; k++)
    if (lanes[k]) static_cast<Arg<T>*>(lanes[k]->coll.args)->r = v;
}

// ballot / vote: v is the predicate (0/1); r of every lane = mask of lanes with v != 0
MMT_EMU_RT inline void resolve_ballot(Fiber** lanes, Group*) {
  uint32_t m = 0;
  for (int k = 0; k < kSimd; k++)
    if (lanes[k] && static_cast<Arg<uint32_t>*>(lanes[k]->coll.args)->v) m |= 1u << k;
  for (int k = 0; k < kSimd; k++)
    if (lanes[k]) static_cast<Arg<uint32_t>*>(lanes[k]->coll.args)->r = m;
}
MMT_EMU_RT inline void resolve_active(Fiber** lanes, Group*) {
  uint32_t m = 0;
  for (int k = 0; k < kSimd; k++)
    if (lanes[k]) m |= 1u << k;
  for (int k = 0; k < kSimd; k++)
    if (lanes[k]) static_cast<Arg<uint32_t>*>(lanes[k]->coll.args)->r = m;
}
MMT_EMU_RT inline void resolve_nop(Fiber**, Group*) {}

#define MMT_EMU_SITE __builtin_return_address(0)

template <class T, int OP, bool QUAD = false>
MMT_EMU_RT T coll_reduce(T v, uint32_t mask, const char* what) {
  Arg<T> a{v, v, 0, kSimd};
  collective(&resolve_reduce<T, OP, QUAD>, &a, mask, MMT_EMU_SITE, what);
  return a.r;
}
template <class T, bool INCL, int OP, bool QUAD = false>
MMT_EMU_RT T coll_scan(T v, uint32_t mask, const char* what) {
  Arg<T> a{v, v, 0, kSimd};
  collective(&resolve_scan<T, INCL, OP, QUAD>, &a, mask, MMT_EMU_SITE, what);
  return a.r;
}
template <class T, int MODE>
MMT_EMU_RT T coll_shuffle(T v, int p, int width, uint32_t mask, const char* what) {
  Arg<T> a{v, v, p, width};
  collective(&resolve_shuffle<T, MODE>, &a, mask, MMT_EMU_SITE, what);
  return a.r;
}
template <class T>
MMT_EMU_RT T coll_broadcast_first(T v, uint32_t mask, const char* what) {
  Arg<T> a{v, v, 0, kSimd};
  collective(&resolve_broadcast_first<T>, &a, mask, MMT_EMU_SITE, what);
  return a.r;
}
MMT_EMU_RT inline uint32_t coll_ballot(bool pred, uint32_t mask, const char* what) {
  Arg<uint32_t> a{pred ? 1u : 0u, 0u, 0, kSimd};
  collective(&resolve_ballot, &a, mask, MMT_EMU_SITE, what);
  return a.r;
}
MMT_EMU_RT inline uint32_t coll_active(uint32_t mask, const char* what) {
  Arg<uint32_t> a{0u, 0u, 0, kSimd};
  collective(&resolve_active, &a, mask, MMT_EMU_SITE, what);
  return a.r;
}
MMT_EMU_RT inline void coll_sync(uint32_t mask, const char* what) {
  Arg<uint32_t> a{0u, 0u, 0, kSimd};
  collective(&resolve_nop, &a, mask, MMT_EMU_SITE, what);
}
// site = source line of the barrier call (0 when unknown): threads of a group must wait at the
// same line (check mode). Code addresses cannot be used: the optimizer duplicates paths.
MMT_EMU_RT inline void barrier(const char*, int line = 0) {
  barrier_at(reinterpret_cast<const void*>(uintptr_t(line)));
}

// ------------------------------------------------------------------------------------------
// atomics on device / threadgroup memory (real atomics: groups run on several OS threads)
// ------------------------------------------------------------------------------------------
template <class T>
MMT_EMU_RT T atomic_fetch_op(T* p, T v, int op) {
  note_atomic(p, sizeof(T));
  if constexpr (std::is_integral_v<T>) {
    switch (op) {
      case 0: return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
      case 1: return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED);
      case 2: return __atomic_fetch_and(p, v, __ATOMIC_RELAXED);
      case 3: return __atomic_fetch_or(p, v, __ATOMIC_RELAXED);
      case 4: return __atomic_fetch_xor(p, v, __ATOMIC_RELAXED);
      case 7: return __atomic_exchange_n(p, v, __ATOMIC_RELAXED);
      default: break;
    }
  }
  static_assert(sizeof(T) == 2 || sizeof(T) == 4 || sizeof(T) == 8, "atomic of unsupported size");
  using U = std::conditional_t<sizeof(T) == 2, uint16_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>;
  U* up = reinterpret_cast<U*>(p);
  U old = __atomic_load_n(up, __ATOMIC_RELAXED);
  for (;;) {
    T o;
    memcpy(&o, &old, sizeof(T));
    T n;
    if (op == 0) n = T(o + v);
    else if (op == 1) n = T(o - v);
    else if (op == 5) n = v < o ? v : o;
    else if (op == 6) n = o < v ? v : o;
    else n = v;
    U nu;
    memcpy(&nu, &n, sizeof(T));
    if (__atomic_compare_exchange_n(up, &old, nu, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return o;
  }
}
template <class T>
MMT_EMU_RT bool atomic_cas(T* p, T* expected, T desired) {
  note_atomic(p, sizeof(T));
  using U = std::conditional_t<sizeof(T) == 2, uint16_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>;
  U e, d;
  memcpy(&e, expected, sizeof(T));
  memcpy(&d, &desired, sizeof(T));
  const bool ok = __atomic_compare_exchange_n(reinterpret_cast<U*>(p), &e, d, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  memcpy(expected, &e, sizeof(T));
  return ok;
}
template <class T>
MMT_EMU_RT T atomic_load(const T* p) {
  note_atomic(p, sizeof(T));
  T r;
  using U = std::conditional_t<sizeof(T) == 2, uint16_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>;
  U u = __atomic_load_n(reinterpret_cast<const U*>(p), __ATOMIC_RELAXED);
  memcpy(&r, &u, sizeof(T));
  return r;
}
template <class T>
MMT_EMU_RT void atomic_store(T* p, T v) {
  note_atomic(p, sizeof(T));
  using U = std::conditional_t<sizeof(T) == 2, uint16_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>;
  U u;
  memcpy(&u, &v, sizeof(T));
  __atomic_store_n(reinterpret_cast<U*>(p), u, __ATOMIC_RELAXED);
}

// ------------------------------------------------------------------------------------------
// launching
// ------------------------------------------------------------------------------------------
struct StackRegion {
  char* base;
  int cap;
  bool busy;
};

MMT_EMU_RT inline std::mutex& region_mu() {
  static std::mutex m;
  return m;
}
MMT_EMU_RT inline std::vector<StackRegion>& regions() {
  static std::vector<StackRegion> r;
  return r;
}

// All fiber stacks live in one reserved address range (so `on_fiber` is one range test):
// kMaxRegions regions of kMaxFibers slots, committed lazily (MAP_NORESERVE).
constexpr int kMaxFibers = 1024;
constexpr int kMaxRegions = 64;
MMT_EMU_RT inline char* reserve_base() {
  static char* base = nullptr;
  if (!base) {
    const size_t bytes = size_t(kMaxRegions) * kMaxFibers * kStack + kStack;
    char* raw = static_cast<char*>(mmap(nullptr, bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (raw == MAP_FAILED) return nullptr;
    base = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(raw) + kStack - 1) & ~(uintptr_t)(kStack - 1));
    uintptr_t* r = stack_range();
    r[0] = reinterpret_cast<uintptr_t>(base);
    r[1] = reinterpret_cast<uintptr_t>(base) + size_t(kMaxRegions) * kMaxFibers * kStack;
  }
  return base;
}

MMT_EMU_RT inline char* acquire_region(int nfib) {
  std::lock_guard<std::mutex> lk(region_mu());
  if (nfib > kMaxFibers) return nullptr;
  for (auto& r : regions())
    if (!r.busy) {
      r.busy = true;
      return r.base;
    }
  char* all = reserve_base();
  if (!all || int(regions().size()) >= kMaxRegions) return nullptr;
  char* base = all + regions().size() * size_t(kMaxFibers) * kStack;
  for (int i = 0; i < kMaxFibers; i++) {  // header page(s) + stack, with a guard page between
    char* slot = base + size_t(i) * kStack;
    if (mprotect(slot, kHeader, PROT_READ | PROT_WRITE) != 0) return nullptr;
    if (mprotect(slot + kHeader + kPage, kStack - kHeader - kPage, PROT_READ | PROT_WRITE) != 0) return nullptr;
  }
  regions().push_back({base, kMaxFibers, true});
  return base;
}
MMT_EMU_RT inline void release_region(char* base) {
  std::lock_guard<std::mutex> lk(region_mu());
  for (auto& r : regions())
    if (r.base == base) r.busy = false;
}

MMT_EMU_RT inline void fiber_exit(Fiber* f) {
  Group* g = f->g;
  f->state = DONE;
  g->live--;
  g->sg_runnable[f->sg]--;
  schedule_from(f);
  __builtin_unreachable();
}

MMT_EMU_RT inline void fiber_entry() {
  Fiber* f = cur_fiber();
  f->g->L->entry(f);
  fiber_exit(f);
}

MMT_EMU_RT inline void init_fiber_stack(Fiber* f) {
  char* top = reinterpret_cast<char*>(f) + kStack;
#if defined(__x86_64__)
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                                      // alignment slot (fake return address)
  *--sp = reinterpret_cast<void*>(&fiber_entry);        // ret target
  for (int i = 0; i < kCtxWords; i++) *--sp = nullptr;  // rbp rbx r12-r15
  f->sp = sp;
#else
  char* sp = top - 176;
  memset(sp, 0, 176);
  reinterpret_cast<void**>(sp)[11] = reinterpret_cast<void*>(&fiber_entry);  // x30 slot (offset 88)
  f->sp = sp;
#endif
}

struct Worker {
  char* region;
  std::vector<Fiber*> fibers;
  std::vector<char> arena;
  std::vector<Shadow> shadow;
  Group g;
};

MMT_EMU_RT inline void run_group(Launch* L, Worker& w, long gi) {
  Group& g = w.g;
  uint32_t p[3];
  p[0] = uint32_t(gi % L->groups[0]);
  p[1] = uint32_t((gi / L->groups[0]) % L->groups[1]);
  p[2] = uint32_t(gi / (long(L->groups[0]) * L->groups[1]));
  uint32_t sz[3];
  for (int d = 0; d < 3; d++) {
    sz[d] = L->tg[d];
    if (L->partial) sz[d] = std::min<uint32_t>(L->tg[d], L->grid[d] - p[d] * L->tg[d]);
    g.pos[d] = p[d];
    g.size[d] = sz[d];
  }
  const int n = int(sz[0] * sz[1] * sz[2]);
  g.L = L;
  g.index = gi;
  g.n = n;
  g.nsg = (n + kSimd - 1) / kSimd;
  g.live = n;
  g.at_bar = 0;
  for (int s = 0; s < 32; s++) {
    g.sg_runnable[s] = 0;
    g.sg_waiting[s] = 0;
    g.sg_stamp[s] = ++g.stamp_counter;
  }
  g.nsites = 0;
  g.arena_used = L->dyn_smem;
  g.failed = false;
  g.err[0] = 0;
  g.epoch++;
  g.start_epoch = g.epoch;
  g.fibers = w.fibers.data();
  for (int i = 0; i < n; i++) {
    Fiber* f = w.fibers[i];
    f->g = &g;
    f->linear = uint32_t(i);
    f->lane = uint32_t(i % kSimd);
    f->sg = uint32_t(i / kSimd);
    f->tid[0] = uint32_t(i % sz[0]);
    f->tid[1] = uint32_t((i / sz[0]) % sz[1]);
    f->tid[2] = uint32_t(i / (sz[0] * sz[1]));
    f->state = RUNNABLE;
    f->ncp = 0;
    f->cp_next_group = 0;
    f->bar_site = nullptr;
    g.sg_runnable[f->sg]++;
    init_fiber_stack(f);
  }
  if (L->check && g.arena_cap) memset(g.arena, 0xff, g.arena_cap);  // uninitialized shared memory
  mmt_emu_ctx_switch(&g.sched_sp, w.fibers[0]->sp);
}

// A fault inside a fiber (wild pointer, fiber stack overflow) fails that thread like a check-mode
// finding instead of killing the process: the handler runs on an alternate stack and switches
// straight back to the worker's scheduler context.
MMT_EMU_NOSAN inline struct sigaction* old_segv() {
  static struct sigaction a[2];
  return a;
}
MMT_EMU_RT inline void segv_handler(int sig, siginfo_t* si, void* ucv) {
  ucontext_t* uc = static_cast<ucontext_t*>(ucv);
#if defined(__x86_64__)
  const uintptr_t sp = uintptr_t(uc->uc_mcontext.gregs[REG_RSP]);
#else
  const uintptr_t sp = uintptr_t(uc->uc_mcontext.sp);
#endif
  const uintptr_t* r = stack_range();
  if (!(sp >= r[0] && sp < r[1])) {  // not ours: let the previous handler see the re-fault
    sigaction(sig, &old_segv()[sig == SIGSEGV ? 0 : 1], nullptr);
    return;
  }
  Fiber* f = reinterpret_cast<Fiber*>(sp & ~(uintptr_t)(kStack - 1));
  Group* g = f->g;
  const char* a = static_cast<const char*>(si->si_addr);
  const char* fh = reinterpret_cast<const char*>(f);
  char what[512];
  if (a >= fh + kHeader - kPage && a < fh + kHeader + 2 * kPage) {
    snprintf(what, sizeof what, "stack overflow of the emulated thread (deep recursion or huge local arrays; "
             "the emulator gives each thread %zu KB)", (kStack - kHeader - kPage) / 1024);
  } else {
    snprintf(what, sizeof what, "invalid memory access at address %p (a wild pointer%s)", (const void*)a,
             g->L->check ? "" : "; run with check=True to locate out-of-bounds accesses");
    for (int i = 0; i < g->L->nbufs; i++) {
      const Buffer& b = g->L->buffers[i];
      if (a >= b.lo - 64 * kPage && a < b.hi + 64 * kPage) {
        const long long off = (long long)(a - b.lo);
        snprintf(what, sizeof what, "out-of-bounds access of buffer '%s' near element index %lld (fault at byte "
                 "offset %lld; buffer has %lld elements)", b.name, off >= 0 ? off / b.elem : -((-off + b.elem - 1) / b.elem),
                 off, (long long)((b.hi - b.lo) / b.elem));
        break;
      }
    }
  }
  char thr[256];
  describe_thread(f, thr, sizeof thr);
  snprintf(g->err, sizeof g->err, "kernel %s, %s: %s", g->L->kernel_name, thr, what);
  g->failed = true;
  f->state = DONE;
  void* dummy;
  mmt_emu_ctx_switch(&dummy, g->sched_sp);
}

MMT_EMU_RT inline void worker_main(Launch* L, Worker* w) {
  const long total = long(L->groups[0]) * L->groups[1] * L->groups[2];
  // alternate signal stack for this OS thread (a fiber stack overflow leaves no room on it)
  static thread_local std::vector<char> alt(1 << 16);
  stack_t ss{}, old_ss{};
  ss.ss_sp = alt.data();
  ss.ss_size = alt.size();
  sigaltstack(&ss, &old_ss);
  struct AltRestore {
    stack_t o;
    ~AltRestore() { sigaltstack(&o, nullptr); }
  } restore{old_ss};
  for (;;) {
    if (L->stop.load()) break;
    const long gi = L->next.fetch_add(1);
    if (gi >= total) break;
    run_group(L, *w, gi);
    if (w->g.failed) {
      std::lock_guard<std::mutex> lk(L->mu);
      if (L->err_group < 0 || gi < L->err_group) {
        L->err_group = gi;
        memcpy(L->err, w->g.err, sizeof L->err);
      }
      L->stop.store(true);
    }
  }
}

// Run all groups. Returns 0 on success, 1 on a kernel error (message in L->err), 2 on a setup error.
MMT_EMU_RT inline int run_launch(Launch* L, int nworkers, size_t arena_bytes) {
  const int nfib = int(L->tg[0] * L->tg[1] * L->tg[2]);
  const long total = long(L->groups[0]) * L->groups[1] * L->groups[2];
  if (total == 0 || nfib == 0) return 0;
  if (nworkers > total) nworkers = int(total);
  if (nworkers < 1) nworkers = 1;
  L->next.store(0);
  L->stop.store(false);
  L->err_group = -1;
  L->err[0] = 0;
  std::vector<Worker> workers(nworkers);
  for (auto& w : workers) {
    w.region = acquire_region(nfib);
    if (!w.region) {
      snprintf(L->err, sizeof L->err, "emulator: cannot map fiber stacks for %d threads", nfib);
      return 2;
    }
    w.fibers.resize(nfib);
    for (int i = 0; i < nfib; i++) w.fibers[i] = reinterpret_cast<Fiber*>(w.region + size_t(i) * kStack);
    w.arena.assign(arena_bytes + 64, 0);
    w.g.arena = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(w.arena.data()) + 63) & ~uintptr_t(63));
    w.g.arena_cap = arena_bytes;
    if (L->check) w.shadow.assign(arena_bytes, Shadow{});
    w.g.shadow = w.shadow.data();
    w.g.epoch = 0;
    w.g.stamp_counter = 0;
  }
  if (L->check) __atomic_add_fetch(&mmt_emu_check_active(), 1, __ATOMIC_SEQ_CST);  // a count: launches may overlap
  struct sigaction sa {};
  sa.sa_sigaction = &segv_handler;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &old_segv()[0]);
  sigaction(SIGBUS, &sa, &old_segv()[1]);
  if (nworkers == 1) {
    worker_main(L, &workers[0]);
  } else {
    std::vector<std::thread> ts;
    for (int i = 0; i < nworkers; i++) ts.emplace_back(worker_main, L, &workers[i]);
    for (auto& t : ts) t.join();
  }
  sigaction(SIGSEGV, &old_segv()[0], nullptr);
  sigaction(SIGBUS, &old_segv()[1], nullptr);
  if (L->check) __atomic_sub_fetch(&mmt_emu_check_active(), 1, __ATOMIC_SEQ_CST);
  for (auto& w : workers) release_region(w.region);
  return L->err_group >= 0 ? 1 : 0;
}

// check mode: copy every buffer into its own mapping with PROT_NONE pages on both sides, so
// that accesses just past either end are caught by the hooks (and wild ones fault).
struct Guarded {
  char* map;
  size_t map_bytes;
  char* data;
};
MMT_EMU_RT inline Guarded guard_buffer(const void* src, size_t bytes) {
  const size_t body = (bytes + kPage - 1) / kPage * kPage + kPage;
  const size_t total = body + 2 * kPage;
  char* m = static_cast<char*>(mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (m == MAP_FAILED) return {nullptr, 0, nullptr};
  mprotect(m, kPage, PROT_NONE);
  mprotect(m + total - kPage, kPage, PROT_NONE);
  // end of data as close to the trailing guard as 16-byte alignment allows
  char* data = m + total - kPage - ((bytes + 15) / 16 * 16);
  if (bytes) memcpy(data, src, bytes);
  return {m, total, data};
}

}  // namespace mmt_emu
