// CPU linear kernel for MindSpore's AOT custom op: out[..., N] (float32) = x[..., K] (float32) · Wᵀ.
//
// W is float16 or float32 and stored either [N, K] ("nt", transpose_b, like torch.nn.Linear) or [K, N]
// ("nn", the [in, out] layout). Accumulation is float32 throughout.
//
// Exported entry points (MindSpore AOT CPU signature
//   int f(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void* stream, void* extra)
// with params = {x, w, out}):
//   vg_linear_nt_avx512, vg_linear_nn_avx512   AVX-512F (+ F16C, FMA)
//   vg_linear_nt_avx2,   vg_linear_nn_avx2     AVX2 + FMA + F16C
// and the weight-only quantized products (params = {x, q, scale, out}; q int8 [N, K] for 8 bits or [N, K/2] for
// 4 bits, two values per byte, the even column in the high nibble as THUDM's int4WeightCompression packs them;
// scale float16 [N]; out = (x · qᵀ) · scale, float32 accumulation):
//   vg_qlinear8_avx512, vg_qlinear4_avx512, vg_qlinear8_avx2, vg_qlinear4_avx2
// and all six again as *_avx512vnni (AVX-512 BW + VNNI): the same except for quantized weights times 1-8 rows, where
// x is rounded to int16 per row (scale max|x| / 32767: a relative error under 2e-5 of max|x| per element, below
// float16's rounding) and the products run on vpdpwssd (int16 pairs into int32), which the int4 unpacking
// otherwise leaves compute-bound on two cores.
// and plain C helpers for the loader: vg_cpu_features(), vg_num_threads(), vg_abi_version().
//
// One translation unit, no -march flags: the kernel body at the end of this file is included three times, under
// `#pragma GCC target("avx2,fma,f16c")`, an AVX-512 target and an AVX-512 VNNI one, into three namespaces, so the
// library loads on any x86-64 CPU and only the path the loader picks (after checking vg_cpu_features) runs.
//
// Work split: the N dimension is cut into up to 8 chunks per thread, which the threads of a small persistent
// pool (the calling thread plus nthreads-1 workers that spin VISUALGLM_KERNEL_SPIN_US, default 100 us, then
// sleep on a futex) claim one at a time. Thread count: VISUALGLM_KERNEL_THREADS, else the number of CPUs in
// the process's affinity mask. Jobs under 0.2 MFLOP run on the calling thread alone.
//   M <= 8 rows  ("decode"): every weight element is read once for all rows, bandwidth-bound.
//   M >  8 rows  ("prefill"): blocked for cache reuse; weight blocks are converted (fp16, int8, int4 times their
//                row scales) or copied (fp32) into a per-thread fp32 buffer that all rows reuse.
// int4: every block of 2·VW columns of x is copied with its even columns first, then its odd ones, so that
// the two vectors one byte-vector of weights unpacks into (high nibbles = even columns, low = odd) meet their
// x without a shuffle; the K % (2·VW) tail keeps the natural order and runs scalar.
// Rows of x (M >= 2) and of weight blocks are copied at a padded stride: rows 4 KB apart share one L1 set.

#ifndef VG_KERNEL_BODY
#include <immintrin.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <mutex>
#include <thread>
#include <type_traits>

#ifndef __x86_64__
#error "linear_cpu.cc is x86-64 only"
#endif

namespace vg {

typedef void (*JobFn)(void* ctx, int chunk, int chunks);

// ------------------------------------------------------------------------------------------------------
// Thread pool: `n` participants = the caller + n-1 workers. run(chunks, fn, ctx) calls fn(ctx, c, chunks) once
// for every chunk c; the caller and the workers claim chunks from a shared counter, so a participant that
// the OS has descheduled (other processes on the machine) delays the call by at most the chunk it holds,
// and a worker that wakes late finds nothing left and touches nothing. One job at a time; a second caller
// that finds the pool busy runs its chunks itself.
//
// Job state: next_ = (generation << 32) | next unclaimed chunk; desc_[generation & 1] = the job's fn, ctx and
// chunk count, written before next_ is published. A claim is a CAS on next_ with the generation it read;
// when it succeeds the job is still running (it cannot finish with a chunk unclaimed), so the descriptor read
// before the CAS was that job's (overwriting that slot needs two later jobs, which would have changed next_).
// ------------------------------------------------------------------------------------------------------
static long futex_op(std::atomic<uint32_t>* addr, int op, uint32_t val) {
  return syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), op | FUTEX_PRIVATE_FLAG, val, nullptr, nullptr, 0);
}

static inline void cpu_relax() { _mm_pause(); }

static int env_int(const char* name, int fallback) {
  const char* s = getenv(name);
  if (!s || !*s) return fallback;
  char* end = nullptr;
  long v = strtol(s, &end, 10);
  if (end == s || v < 0 || v > 1000000) return fallback;
  return static_cast<int>(v);
}

class Pool {
 public:
  explicit Pool(int n) : n_(n) {
    spin_ns_ = static_cast<int64_t>(env_int("VISUALGLM_KERNEL_SPIN_US", 100)) * 1000;
    for (int i = 1; i < n_; ++i) std::thread(&Pool::worker, this).detach();  // lives as long as the process
  }
  int size() const { return n_; }

  void run(int chunks, JobFn fn, void* ctx) {
    if (chunks <= 1 || n_ <= 1) {
      for (int c = 0; c < chunks; ++c) fn(ctx, c, chunks);
      return;
    }
    std::unique_lock<std::mutex> lock(busy_, std::try_to_lock);
    if (!lock.owns_lock()) {  // another thread's call is using the pool: do the work here
      for (int c = 0; c < chunks; ++c) fn(ctx, c, chunks);
      return;
    }
    const uint32_t g = ++gen_;
    Desc& d = desc_[g & 1];
    d.fn.store(fn, std::memory_order_relaxed);
    d.ctx.store(ctx, std::memory_order_relaxed);
    d.total.store(static_cast<uint32_t>(chunks), std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    next_.store(static_cast<uint64_t>(g) << 32, std::memory_order_release);
    wake_.store(g, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) futex_op(&wake_, FUTEX_WAKE, INT_MAX);
    work(g);
    for (int i = 0; done_.load(std::memory_order_acquire) != static_cast<uint32_t>(chunks); ++i) {
      if (i < (1 << 14)) cpu_relax(); else sched_yield();  // chunks still running on workers
    }
  }

 private:
  struct Desc {
    std::atomic<JobFn> fn{nullptr};
    std::atomic<void*> ctx{nullptr};
    std::atomic<uint32_t> total{0};
  };

  // Claims and runs chunks of job g until it has none left (or a newer job replaced it).
  void work(uint32_t g) {
    uint64_t v = next_.load(std::memory_order_acquire);
    for (;;) {
      if (static_cast<uint32_t>(v >> 32) != g) return;
      const Desc& d = desc_[g & 1];
      JobFn fn = d.fn.load(std::memory_order_relaxed);
      void* ctx = d.ctx.load(std::memory_order_relaxed);
      const uint32_t total = d.total.load(std::memory_order_relaxed);
      const uint32_t idx = static_cast<uint32_t>(v);
      if (idx >= total) return;
      if (next_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
        fn(ctx, static_cast<int>(idx), static_cast<int>(total));
        done_.fetch_add(1, std::memory_order_acq_rel);
        v = next_.load(std::memory_order_acquire);
      }
    }
  }

  void worker() {
    uint32_t seen = 0;  // wake_'s value before any job (a job may be posted before this thread starts)
    for (;;) {
      uint32_t g = wake_.load(std::memory_order_acquire);
      if (g == seen) {
        auto start = std::chrono::steady_clock::now();
        for (int i = 0;; ++i) {
          cpu_relax();
          g = wake_.load(std::memory_order_acquire);
          if (g != seen) break;
          if ((i & 255) == 255 && std::chrono::steady_clock::now() - start > std::chrono::nanoseconds(spin_ns_)) break;
        }
        while (g == seen) {
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          g = wake_.load(std::memory_order_seq_cst);
          if (g == seen) futex_op(&wake_, FUTEX_WAIT, seen);
          sleepers_.fetch_sub(1, std::memory_order_seq_cst);
          g = wake_.load(std::memory_order_acquire);
        }
      }
      seen = g;
      work(g);
    }
  }

  const int n_;
  int64_t spin_ns_ = 0;
  std::mutex busy_;
  uint32_t gen_ = 0;                   // the last job's generation (written under busy_)
  Desc desc_[2];
  std::atomic<uint64_t> next_{0};
  std::atomic<uint32_t> done_{0};
  std::atomic<uint32_t> wake_{0};
  std::atomic<int> sleepers_{0};
};

static int default_threads() {
  int n = env_int("VISUALGLM_KERNEL_THREADS", 0);
  if (n > 0) return n;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) n = CPU_COUNT(&set);
  if (n <= 0) n = static_cast<int>(std::thread::hardware_concurrency());
  return n > 0 ? n : 1;
}

static std::atomic<Pool*> g_pool{nullptr};
static std::mutex g_pool_mutex;

static void after_fork_in_child() { g_pool.store(nullptr); }  // the workers did not survive fork(): start anew (leaks)

static Pool* pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p) return p;
  std::lock_guard<std::mutex> guard(g_pool_mutex);
  p = g_pool.load(std::memory_order_acquire);
  if (!p) {
    static std::once_flag atfork_once;
    std::call_once(atfork_once, [] { pthread_atfork(nullptr, nullptr, after_fork_in_child); });
    p = new Pool(default_threads());
    g_pool.store(p, std::memory_order_release);
  }
  return p;
}

// Splits [0, n) into `chunks` contiguous ranges whose starts are multiples of `align`: the range of `chunk`.
static inline void split_range(int64_t n, int64_t align, int chunk, int chunks, int64_t* begin, int64_t* end) {
  int64_t units = (n + align - 1) / align;
  int64_t b = units * chunk / chunks, e = units * (chunk + 1) / chunks;
  *begin = b * align < n ? b * align : n;
  *end = e * align < n ? e * align : n;
}

// Per-thread scratch (64-byte aligned), grown on demand and kept: slot 0 holds the calling thread's padded
// copy of x (read by all threads), slot 1 a chunk's weight block.
static float* scratch(int slot, size_t floats) {
  thread_local float* buf[2] = {nullptr, nullptr};
  thread_local size_t cap[2] = {0, 0};
  if (floats > cap[slot]) {
    free(buf[slot]);
    size_t bytes = ((floats * sizeof(float) + 63) / 64) * 64;
    buf[slot] = static_cast<float*>(aligned_alloc(64, bytes));
    cap[slot] = buf[slot] ? floats : 0;
  }
  return buf[slot];
}

// Row stride for copies of x and weight blocks: rows whose stride is a multiple of 4 KB share one L1 set
// (x's rows, K = 4096, would evict each other); this stride is 64 bytes off a multiple of 4 KB.
static inline int64_t padded_stride(int64_t cols) { return ((cols + 15) / 16) * 16 + ((cols + 15) / 16 % 2 ? 0 : 16); }

// ------------------------------------------------------------------------------------------------------
// Argument parsing shared by all entry points.
// ------------------------------------------------------------------------------------------------------
struct Problem {
  const float* x;
  const void* w;
  float* out;
  bool w_half;
  int64_t M, K, N;
  int64_t ldx;  // x's row stride (K, or a padded copy's)
  const uint16_t* scale = nullptr;  // quantized weights: float16 [N]
  int bits = 0;                     // 8 or 4 for quantized weights, 0 for float ones
  const int16_t* xq = nullptr;      // VNNI decode: x rounded to int16, rows ldxq apart, and each row's scale
  int64_t ldxq = 0;
  float xscale[8] = {};
};

static bool is_f32(const char* t) { return t && (!strcmp(t, "float32") || !strcmp(t, "float")); }
static bool is_f16(const char* t) { return t && (!strcmp(t, "float16") || !strcmp(t, "half")); }

// x [..., K], w [N, K] (nt) or [K, N] (nn), out [..., N]. Returns false on anything unexpected.
static bool parse(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, bool nt,
                  Problem* p) {
  if (nparam != 3 || !params || !ndims || !shapes || !dtypes) return false;
  if (ndims[0] < 1 || ndims[1] != 2 || ndims[2] != ndims[0]) return false;
  if (!is_f32(dtypes[0]) || !is_f32(dtypes[2]) || !(is_f32(dtypes[1]) || is_f16(dtypes[1]))) return false;
  int64_t M = 1;
  for (int i = 0; i + 1 < ndims[0]; ++i) {
    if (shapes[0][i] < 0 || shapes[2][i] != shapes[0][i]) return false;
    M *= shapes[0][i];
  }
  int64_t K = shapes[0][ndims[0] - 1];
  int64_t wk = nt ? shapes[1][1] : shapes[1][0];
  int64_t N = nt ? shapes[1][0] : shapes[1][1];
  if (K < 0 || N < 0 || wk != K || shapes[2][ndims[2] - 1] != N) return false;
  p->x = static_cast<const float*>(params[0]);
  p->w = params[1];
  p->out = static_cast<float*>(params[2]);
  p->w_half = is_f16(dtypes[1]);
  p->M = M;
  p->K = K;
  p->N = N;
  p->ldx = K;
  return true;
}

// x [..., K] float32, q int8 [N, K·bits/8], scale float16 [N], out [..., N] float32.
static bool parse_quantized(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, int bits,
                            Problem* p) {
  if (nparam != 4 || !params || !ndims || !shapes || !dtypes) return false;
  if (ndims[0] < 1 || ndims[1] != 2 || ndims[2] != 1 || ndims[3] != ndims[0]) return false;
  if (!is_f32(dtypes[0]) || !dtypes[1] || strcmp(dtypes[1], "int8") || !is_f16(dtypes[2]) || !is_f32(dtypes[3]))
    return false;
  int64_t M = 1;
  for (int i = 0; i + 1 < ndims[0]; ++i) {
    if (shapes[0][i] < 0 || shapes[3][i] != shapes[0][i]) return false;
    M *= shapes[0][i];
  }
  const int64_t K = shapes[0][ndims[0] - 1], N = shapes[1][0];
  if (K < 0 || N < 0 || K * bits % 8 || shapes[1][1] != K * bits / 8 || shapes[2][0] != N ||
      shapes[3][ndims[3] - 1] != N)
    return false;
  p->x = static_cast<const float*>(params[0]);
  p->w = params[1];
  p->scale = static_cast<const uint16_t*>(params[2]);
  p->out = static_cast<float*>(params[3]);
  p->w_half = false;
  p->M = M;
  p->K = K;
  p->N = N;
  p->ldx = K;
  p->bits = bits;
  return true;
}

// How many chunks to cut a job of `flops` into, given `units` = the most pieces its N dimension splits into:
// 1 (run inline) for small jobs, else up to 8 per thread, so that a descheduled thread holds up little.
// Below ~4 MFLOP (about 100 us on one core) waking a worker gains little, and a woken worker spins on after
// the job: a small model's graph of many such products kept a second core busy doing nothing (measured on
// the demo model's decode step, 8 x 128 x 384: ~11 ms of spinning per served request).
static int chunks_for(double flops, int64_t units) {
  const int n = pool()->size();
  if (n <= 1 || flops < 4.0e6 || units <= 1) return 1;
  int64_t chunks = 8LL * n;
  if (chunks > units) chunks = units;
  return static_cast<int>(chunks);
}

}  // namespace vg

// ---------------------------------- the ISA-specific kernels ----------------------------------------
#define VG_KERNEL_BODY 1

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define VG_ISA 256
#define VG_NS vg_avx2
#include __FILE__
#undef VG_NS
#undef VG_ISA
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")
#define VG_ISA 512
#define VG_NS vg_avx512
#include __FILE__
#undef VG_NS
#undef VG_ISA
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vnni,avx2,fma,f16c")
#define VG_ISA 512
#define VG_VNNI 1
#define VG_NS vg_avx512vnni
#include __FILE__
#undef VG_NS
#undef VG_VNNI
#undef VG_ISA
#pragma GCC pop_options

// ------------------------------------------- exports ------------------------------------------------
extern "C" {

// Bit 0: AVX2 + FMA + F16C usable; bit 1: AVX-512F usable as well (OS state saving included); bit 2: AVX-512 BW
// and VNNI as well.
int vg_cpu_features(void) {
  __builtin_cpu_init();
  int f = 0;
  bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  unsigned a, b, c, d;
  bool f16c = false;
  if (__builtin_cpu_supports("avx")) {  // F16C: CPUID.1:ECX bit 29
    __asm__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
    f16c = (c >> 29) & 1;
  }
  if (avx2 && f16c) f |= 1;
  if ((f & 1) && __builtin_cpu_supports("avx512f")) f |= 2;
  if ((f & 2) && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni")) f |= 4;
  return f;
}

int vg_num_threads(void) { return vg::pool()->size(); }

int vg_abi_version(void) { return 2; }

// An entry point: parse the arguments (the expression `parsed`, which fills p), then the product.
#define VG_ENTRY(name, ns, parsed, nt)                                                                   \
  int name(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void* stream,   \
           void* extra) {                                                                                \
    (void)stream;                                                                                        \
    (void)extra;                                                                                         \
    vg::Problem p;                                                                                       \
    if (!(parsed)) return 1;                                                                             \
    return ns::linear(p, nt);                                                                            \
  }
#define VG_EXPORT(name, ns, nt) VG_ENTRY(name, ns, vg::parse(nparam, params, ndims, shapes, dtypes, nt, &p), nt)
#define VG_EXPORT_Q(name, ns, bits) \
  VG_ENTRY(name, ns, vg::parse_quantized(nparam, params, ndims, shapes, dtypes, bits, &p), true)

VG_EXPORT(vg_linear_nt_avx512, vg_avx512, true)
VG_EXPORT(vg_linear_nn_avx512, vg_avx512, false)
VG_EXPORT(vg_linear_nt_avx2, vg_avx2, true)
VG_EXPORT(vg_linear_nn_avx2, vg_avx2, false)

VG_EXPORT_Q(vg_qlinear8_avx512, vg_avx512, 8)
VG_EXPORT_Q(vg_qlinear4_avx512, vg_avx512, 4)
VG_EXPORT_Q(vg_qlinear8_avx2, vg_avx2, 8)
VG_EXPORT_Q(vg_qlinear4_avx2, vg_avx2, 4)
VG_EXPORT(vg_linear_nt_avx512vnni, vg_avx512vnni, true)
VG_EXPORT(vg_linear_nn_avx512vnni, vg_avx512vnni, false)
VG_EXPORT_Q(vg_qlinear8_avx512vnni, vg_avx512vnni, 8)
VG_EXPORT_Q(vg_qlinear4_avx512vnni, vg_avx512vnni, 4)

}  // extern "C"

#else  // ================================ VG_KERNEL_BODY ================================================
// Included three times above, with VG_ISA = 256 (AVX2) or 512 (AVX-512, and VG_VNNI for AVX-512 VNNI) and the
// matching target pragma.

namespace VG_NS {

using vg::Problem;

#if VG_ISA == 512
typedef __m512 V;
constexpr int VW = 16;
static inline V vzero() { return _mm512_setzero_ps(); }
static inline V vload(const float* p) { return _mm512_loadu_ps(p); }
static inline V vloadw(const float* p) { return _mm512_loadu_ps(p); }
static inline V vloadw(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
static inline V vloadw(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
// VW bytes of int4 pairs -> their VW high nibbles (even columns) and VW low nibbles (odd columns), sign-extended.
static inline void vload_q4(const int8_t* p, V* even, V* odd) {
  const __m512i b = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  *even = _mm512_cvtepi32_ps(_mm512_srai_epi32(b, 4));
  *odd = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(b, 28), 28));
}
static inline V vbcast(const float* p) { return _mm512_set1_ps(*p); }
static inline V vset1(float v) { return _mm512_set1_ps(v); }
static inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
static inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
static inline V vmul(V a, V b) { return _mm512_mul_ps(a, b); }
static inline void vstore(float* p, V v) { _mm512_storeu_ps(p, v); }
static inline __m256 half_sum(V v) {
  return _mm256_add_ps(_mm512_castps512_ps256(v),
                       _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}
// Tile shapes. Decode (dot products along K): MR rows x NR weight rows, MR*NR + NR + 1 <= 32 registers.
template <int M> struct DecodeNR {
  static constexpr int value = M <= 2 ? 8 : M <= 4 ? 6 : M == 5 ? 5 : M == 6 ? 4 : 3;
};
// int4 decode: each weight row gives two vectors per step, each multiplied by two x vectors per row of x.
template <int M> struct DecodeNR4 { static constexpr int value = M <= 2 ? 4 : M <= 4 ? 3 : M <= 6 ? 2 : 1; };
constexpr int NT_MR = 4, NT_NR = 6;    // prefill, nt layout (dot products on fp32 blocks)
constexpr int NN_MR = 12, NN_NRV = 2;  // prefill, nn layout: 12 rows x 32 columns
#else
typedef __m256 V;
constexpr int VW = 8;
static inline V vzero() { return _mm256_setzero_ps(); }
static inline V vload(const float* p) { return _mm256_loadu_ps(p); }
static inline V vloadw(const float* p) { return _mm256_loadu_ps(p); }
static inline V vloadw(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
static inline V vloadw(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
static inline void vload_q4(const int8_t* p, V* even, V* odd) {
  const __m256i b = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  *even = _mm256_cvtepi32_ps(_mm256_srai_epi32(b, 4));
  *odd = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(b, 28), 28));
}
static inline V vbcast(const float* p) { return _mm256_broadcast_ss(p); }
static inline V vset1(float v) { return _mm256_set1_ps(v); }
static inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
static inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
static inline V vmul(V a, V b) { return _mm256_mul_ps(a, b); }
static inline void vstore(float* p, V v) { _mm256_storeu_ps(p, v); }
static inline __m256 half_sum(V v) { return v; }
template <int M> struct DecodeNR { static constexpr int value = M <= 2 ? 4 : M == 3 ? 3 : M <= 6 ? 2 : 1; };
template <int M> struct DecodeNR4 { static constexpr int value = M <= 1 ? 3 : M <= 3 ? 2 : 1; };
constexpr int NT_MR = 3, NT_NR = 3;
constexpr int NN_MR = 6, NN_NRV = 2;   // 6 rows x 16 columns
#endif

static inline float tof(float v) { return v; }
static inline float tof(uint16_t v) { return _cvtsh_ss(v); }
static inline float tof(int8_t v) { return static_cast<float>(v); }
static inline int q4_high(int8_t b) { return b >> 4; }                             // the even column
static inline int q4_low(int8_t b) { return static_cast<int8_t>(b << 4) >> 4; }    // the odd column

// Sum of each of 4 vectors -> one __m128 {sum(a), sum(b), sum(c), sum(d)}.
static inline __m128 sum4(V a, V b, V c, V d) {
  __m256 t0 = _mm256_hadd_ps(half_sum(a), half_sum(b));  // a01 a23 b01 b23 | a45 a67 b45 b67
  __m256 t1 = _mm256_hadd_ps(half_sum(c), half_sum(d));
  __m256 t2 = _mm256_hadd_ps(t0, t1);                     // a0-3 b0-3 c0-3 d0-3 | a4-7 ...
  return _mm_add_ps(_mm256_castps256_ps128(t2), _mm256_extractf128_ps(t2, 1));
}
static inline float sum1(V a) {
  __m256 h = half_sum(a);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Every register of an accumulator tile set to v.
template <typename T, int MR, int NR>
static inline void fill(T (&tile)[MR][NR], T v) {
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) tile[m][r] = v;
}

// s[r] = the sum of acc[r]'s lanes.
template <int NR>
static inline void row_sums(const V* acc, float* s) {
#pragma GCC unroll 8
  for (int r = 0; r < NR / 4 * 4; r += 4) _mm_storeu_ps(s + r, sum4(acc[r], acc[r + 1], acc[r + 2], acc[r + 3]));
#pragma GCC unroll 8
  for (int r = NR / 4 * 4; r < NR; ++r) s[r] = sum1(acc[r]);
}

// ---------------------------------------------------------------------------------------------------
// Dot-product tile: out[m][r] (+)= sum_k x[m][k] * w[r][k] for m < MR, r < NR (w rows of length K).
// ---------------------------------------------------------------------------------------------------
template <int MR, int NR, typename WT>
static void dot_tile(const float* x, int64_t ldx, const WT* w, int64_t ldw, int64_t K, float* out, int64_t ldo,
                     bool accumulate) {
  V acc[MR][NR];
  fill(acc, vzero());
  const int64_t kv = K - K % VW;
  for (int64_t k = 0; k < kv; k += VW) {
    V wv[NR];
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) wv[r] = vloadw(w + r * ldw + k);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      V xv = vload(x + m * ldx + k);
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) acc[m][r] = vfma(xv, wv[r], acc[m][r]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    float s[NR];
    row_sums<NR>(acc[m], s);
    for (int64_t k = kv; k < K; ++k) {
      const float xk = x[m * ldx + k];
      for (int q = 0; q < NR; ++q) s[q] += xk * tof(w[q * ldw + k]);
    }
    float* o = out + m * ldo;
    if (accumulate) {
      for (int q = 0; q < NR; ++q) o[q] += s[q];
    } else {
      for (int q = 0; q < NR; ++q) o[q] = s[q];
    }
  }
}

// ----------------------------------- nt layout, M <= 8 (decode) ------------------------------------
struct Ctx {
  Problem p;
  std::atomic<int> failed{0};  // a chunk that could not get its scratch buffer
};

template <int M, typename WT>
static void nt_decode_part(const Problem& p, int chunk, int chunks) {
  constexpr int NR = DecodeNR<M>::value;
  int64_t n0, n1;
  vg::split_range(p.N, NR, chunk, chunks, &n0, &n1);
  const WT* w = static_cast<const WT*>(p.w);
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) dot_tile<M, NR, WT>(p.x, p.ldx, w + n * p.K, p.K, p.K, p.out + n, p.N, false);
  for (; n < n1; ++n) dot_tile<M, 1, WT>(p.x, p.ldx, w + n * p.K, p.K, p.K, p.out + n, p.N, false);
}

// f(std::integral_constant<int, M>) for the decode row counts 1 … 8.
template <typename F>
static inline void with_rows(int64_t rows, F&& f) {
  switch (rows) {
    case 1: f(std::integral_constant<int, 1>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    case 3: f(std::integral_constant<int, 3>()); break;
    case 4: f(std::integral_constant<int, 4>()); break;
    case 5: f(std::integral_constant<int, 5>()); break;
    case 6: f(std::integral_constant<int, 6>()); break;
    case 7: f(std::integral_constant<int, 7>()); break;
    default: f(std::integral_constant<int, 8>()); break;
  }
}

template <typename WT>
static void nt_decode_job(void* ctx, int chunk, int chunks) {
  const Problem& p = static_cast<Ctx*>(ctx)->p;
  with_rows(p.M, [&](auto m) { nt_decode_part<decltype(m)::value, WT>(p, chunk, chunks); });
}

// ----------------------------------- quantized, M <= 8 (decode) -------------------------------------
// int4 tile: out[m][r] = sum_k x[m][k] * q[r][k], q's rows ldw bytes apart, x's 2·VW-column blocks permuted
// (even columns, then odd ones) up to the K % (2·VW) tail.
template <int MR, int NR>
static void dot_tile_q4(const float* x, int64_t ldx, const int8_t* w, int64_t ldw, int64_t K, float* out,
                        int64_t ldo) {
  V acc[MR][NR];
  fill(acc, vzero());
  const int64_t kv = K - K % (2 * VW);
  for (int64_t k = 0; k < kv; k += 2 * VW) {
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      V even, odd;
      vload_q4(w + r * ldw + k / 2, &even, &odd);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        acc[m][r] = vfma(vload(x + m * ldx + k), even, acc[m][r]);
        acc[m][r] = vfma(vload(x + m * ldx + k + VW), odd, acc[m][r]);
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    float s[NR];
    row_sums<NR>(acc[m], s);
    for (int64_t k = kv; k < K; k += 2) {
      for (int q = 0; q < NR; ++q) {
        const int8_t b = w[q * ldw + k / 2];
        s[q] += x[m * ldx + k] * q4_high(b) + x[m * ldx + k + 1] * q4_low(b);
      }
    }
    for (int q = 0; q < NR; ++q) out[m * ldo + q] = s[q];
  }
}

#ifdef VG_VNNI
// ------------------------- quantized, M <= 8, int16 x on VNNI: q_tile's tiles there -------------------------
// Steps of 64 columns: 64 int8 weights (two 32-byte loads) or 64 int4 ones (one; high nibbles = even columns,
// low = odd, met by x's even then odd columns, as stage_xq lays them out) sign-extended to int16 and multiplied
// with x's int16 pairs into int32 lanes. The lanes go into float accumulators every VNNI_FLUSH columns, before
// they could overflow: a lane sums VNNI_FLUSH / 16 products of at most 127 · 32767.
constexpr int64_t VNNI_STEP = 64, VNNI_FLUSH = 4096;
template <int M> struct DecodeNRV { static constexpr int value = M <= 1 ? 4 : M <= 2 ? 3 : M <= 4 ? 2 : 1; };

template <int BITS>
static inline void vnni_weights(const int8_t* row, int64_t k, __m512i* first, __m512i* second) {
  if constexpr (BITS == 8) {
    *first = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k)));
    *second = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k + 32)));
  } else {
    const __m512i b = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k / 2)));
    *first = _mm512_srai_epi16(b, 4);
    *second = _mm512_srai_epi16(_mm512_slli_epi16(b, 12), 12);
  }
}

template <int MR, int NR, int BITS>
static void vnni_tile(const Problem& p, const int8_t* w, int64_t ldw, float* out) {
  V facc[MR][NR];
  fill(facc, vzero());
  const int64_t kv = p.K - p.K % VNNI_STEP;
  for (int64_t k0 = 0; k0 < kv; k0 += VNNI_FLUSH) {
    const int64_t k1 = kv - k0 < VNNI_FLUSH ? kv : k0 + VNNI_FLUSH;
    __m512i acc[MR][NR];
    fill(acc, _mm512_setzero_si512());
    for (int64_t k = k0; k < k1; k += VNNI_STEP) {
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) {
        // The next tile's rows at this offset: rows of 2-4 KB are too short for the hardware prefetcher to
        // ramp up on each (measured: int4 read 8 GB/s without this, fp16's longer rows 18 GB/s).
        _mm_prefetch(reinterpret_cast<const char*>(w + (NR + r) * ldw + k * BITS / 8), _MM_HINT_T1);
        __m512i first, second;
        vnni_weights<BITS>(w + r * ldw, k, &first, &second);
#pragma GCC unroll 8
        for (int m = 0; m < MR; ++m) {
          const int16_t* x = p.xq + m * p.ldxq + k;
          acc[m][r] = _mm512_dpwssd_epi32(acc[m][r], first, _mm512_loadu_si512(x));
          acc[m][r] = _mm512_dpwssd_epi32(acc[m][r], second, _mm512_loadu_si512(x + 32));
        }
      }
    }
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) facc[m][r] = vadd(facc[m][r], _mm512_cvtepi32_ps(acc[m][r]));
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    float s[NR];
    row_sums<NR>(facc[m], s);
    const int16_t* x = p.xq + m * p.ldxq;
    for (int q = 0; q < NR; ++q) {
      int64_t t = 0;   // the tail past the last full step, in natural column order
      for (int64_t k = kv; k < p.K; ++k) {
        const int8_t b = w[q * ldw + k * BITS / 8];
        t += int64_t(x[k]) * (BITS == 8 ? b : (k % 2 ? q4_low(b) : q4_high(b)));
      }
      out[m * p.N + q] = (s[q] + static_cast<float>(t)) * p.xscale[m];
    }
  }
}

// x (M <= 8 rows) rounded to int16 in the calling thread's scratch: per row scale max|x| / 32767, int4's
// 64-column blocks with their even columns first. False when no buffer could be had.
static bool stage_xq(Problem* p) {
  const int64_t ld = ((p->K + 63) / 64) * 64 + 32;   // 64 bytes off a multiple of 4 KB (see padded_stride)
  int16_t* xq = reinterpret_cast<int16_t*>(vg::scratch(0, static_cast<size_t>(p->M * ld) / 2 + 16));
  if (!xq) return false;
  const int64_t kv = p->bits == 4 ? p->K - p->K % VNNI_STEP : 0;
  for (int64_t m = 0; m < p->M; ++m) {
    const float* x = p->x + m * p->K;
    float amax = 0.f;
    for (int64_t k = 0; k < p->K; ++k) amax = fabsf(x[k]) > amax ? fabsf(x[k]) : amax;
    const float scale = amax > 0.f ? amax / 32767.f : 1.f;
    const float inv = 1.f / scale;
    int16_t* d = xq + m * ld;
    auto q = [&](float v) {
      const float r = nearbyintf(v * inv);
      return static_cast<int16_t>(r > 32767.f ? 32767.f : r < -32767.f ? -32767.f : r);
    };
    for (int64_t k = 0; k < kv; k += VNNI_STEP) {
      for (int j = 0; j < 32; ++j) {
        d[k + j] = q(x[k + 2 * j]);
        d[k + 32 + j] = q(x[k + 2 * j + 1]);
      }
    }
    for (int64_t k = kv; k < p->K; ++k) d[k] = q(x[k]);
    p->xscale[m] = scale;
  }
  p->xq = xq;
  p->ldxq = ld;
  return true;
}
#endif  // VG_VNNI

template <int M, int NR, int BITS>
static inline void q_tile(const Problem& p, const int8_t* w, int64_t ldw, float* out) {
#ifdef VG_VNNI
  vnni_tile<M, NR, BITS>(p, w, ldw, out);
#else
  if constexpr (BITS == 8) {
    dot_tile<M, NR, int8_t>(p.x, p.ldx, w, ldw, p.K, out, p.N, false);
  } else {
    dot_tile_q4<M, NR>(p.x, p.ldx, w, ldw, p.K, out, p.N);
  }
#endif
}

template <int M, int BITS>
static void q_decode_part(const Problem& p, int chunk, int chunks) {
#ifdef VG_VNNI
  constexpr int NR = DecodeNRV<M>::value;
#else
  constexpr int NR = BITS == 8 ? DecodeNR<M>::value : DecodeNR4<M>::value;
#endif
  int64_t n0, n1;
  vg::split_range(p.N, NR, chunk, chunks, &n0, &n1);
  const int8_t* w = static_cast<const int8_t*>(p.w);
  const int64_t ldw = p.K * BITS / 8;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) q_tile<M, NR, BITS>(p, w + n * ldw, ldw, p.out + n);
  for (; n < n1; ++n) q_tile<M, 1, BITS>(p, w + n * ldw, ldw, p.out + n);
  for (int m = 0; m < M; ++m) {   // the row scales, once per output
    float* o = p.out + m * p.N;
    for (n = n0; n < n1; ++n) o[n] *= tof(p.scale[n]);
  }
}

template <int BITS>
static void q_decode_job(void* ctx, int chunk, int chunks) {
  const Problem& p = static_cast<Ctx*>(ctx)->p;
  with_rows(p.M, [&](auto m) { q_decode_part<decltype(m)::value, BITS>(p, chunk, chunks); });
}


// ----------------------------------- nt layout, M > 8 (prefill) -------------------------------------
// Per thread: its weight rows in blocks of NB rows x KC columns (converted to fp32 if fp16); every MR-row
// slice of x meets every NR-row group of the block.
constexpr int64_t NT_KC = 1024, NT_NB = NT_NR * 8;

typedef void (*DotFn)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t, bool);

template <int MR>
static DotFn nt_tile_fn(int nr) {
  switch (nr) {
    case 1: return &dot_tile<MR, 1, float>;
    case 2: return &dot_tile<MR, (NT_NR >= 2 ? 2 : 1), float>;
    case 3: return &dot_tile<MR, (NT_NR >= 3 ? 3 : 1), float>;
    case 4: return &dot_tile<MR, (NT_NR >= 4 ? 4 : 1), float>;
    case 5: return &dot_tile<MR, (NT_NR >= 5 ? 5 : 1), float>;
    default: return &dot_tile<MR, NT_NR, float>;
  }
}
static DotFn nt_tile(int mr, int nr) {
  switch (mr) {
    case 1: return nt_tile_fn<1>(nr);
    case 2: return nt_tile_fn<(NT_MR >= 2 ? 2 : 1)>(nr);
    case 3: return nt_tile_fn<(NT_MR >= 3 ? 3 : 1)>(nr);
    default: return nt_tile_fn<NT_MR>(nr);
  }
}

template <typename WT>
static void convert_rows(const WT* w, int64_t ldw, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r) {
    const WT* s = w + r * ldw;
    float* d = dst + r * ldd;
    int64_t c = 0;
    for (; c + VW <= cols; c += VW) vstore(d + c, vloadw(s + c));
    for (; c < cols; ++c) d[c] = tof(s[c]);
  }
}

// The weights of the nt prefill: where row n, column k starts, how many bytes cols columns take, and the
// conversion of a block of rows x columns into fp32.
template <typename WT>
struct FloatRows {
  const WT* w;
  int64_t K;
  explicit FloatRows(const Problem& p) : w(static_cast<const WT*>(p.w)), K(p.K) {}
  const char* at(int64_t n, int64_t k) const { return reinterpret_cast<const char*>(w + n * K + k); }
  static int64_t bytes(int64_t cols) { return cols * int64_t(sizeof(WT)); }
  void convert(int64_t n, int64_t rows, int64_t kc, int64_t cols, float* dst, int64_t ldd) const {
    convert_rows<WT>(w + n * K + kc, K, rows, cols, dst, ldd);
  }
};

// Quantized rows, converted times their scale; int4 blocks come out in x's permuted column order.
template <int BITS>
struct QuantRows {
  const int8_t* w;
  const uint16_t* scale;
  int64_t K, ldw;
  explicit QuantRows(const Problem& p)
      : w(static_cast<const int8_t*>(p.w)), scale(p.scale), K(p.K), ldw(p.K * BITS / 8) {}
  const char* at(int64_t n, int64_t k) const { return reinterpret_cast<const char*>(w + n * ldw + k * BITS / 8); }
  static int64_t bytes(int64_t cols) { return cols * BITS / 8; }
  void convert(int64_t n, int64_t rows, int64_t kc, int64_t cols, float* dst, int64_t ldd) const {
    for (int64_t r = 0; r < rows; ++r) {
      const float s = tof(scale[n + r]);
      const V sv = vset1(s);
      const int8_t* src = w + (n + r) * ldw;
      float* d = dst + r * ldd;
      int64_t c = 0;
      if constexpr (BITS == 8) {
        for (; c + VW <= cols; c += VW) vstore(d + c, vmul(vloadw(src + kc + c), sv));
        for (; c < cols; ++c) d[c] = tof(src[kc + c]) * s;
      } else {  // kc is a multiple of 2·VW and cols even
        for (; c + 2 * VW <= cols && kc + c + 2 * VW <= K; c += 2 * VW) {
          V even, odd;
          vload_q4(src + (kc + c) / 2, &even, &odd);
          vstore(d + c, vmul(even, sv));
          vstore(d + c + VW, vmul(odd, sv));
        }
        for (; c < cols; c += 2) {
          const int8_t b = src[(kc + c) / 2];
          d[c] = q4_high(b) * s;
          d[c + 1] = q4_low(b) * s;
        }
      }
    }
  }
};

template <typename Src>
static void nt_prefill_job(void* ctx, int chunk, int chunks) {
  const Problem& p = static_cast<Ctx*>(ctx)->p;
  int64_t n0, n1;
  vg::split_range(p.N, NT_NR, chunk, chunks, &n0, &n1);
  const Src src(p);
  const int64_t ldb = vg::padded_stride(NT_KC);
  float* buf = vg::scratch(1, static_cast<size_t>(NT_NB) * ldb);
  if (!buf) {
    static_cast<Ctx*>(ctx)->failed.store(1);
    return;
  }
  DotFn full = nt_tile(NT_MR, NT_NR);
  const int64_t mtiles = (p.M + NT_MR - 1) / NT_MR;
  for (int64_t kc = 0; kc < p.K; kc += NT_KC) {
    const int64_t kl = p.K - kc < NT_KC ? p.K - kc : NT_KC;
    for (int64_t nb = n0; nb < n1; nb += NT_NB) {
      const int64_t nbl = n1 - nb < NT_NB ? n1 - nb : NT_NB;
      src.convert(nb, nbl, kc, kl, buf, ldb);  // fp32 copy, padded stride
      // The next block's weights are fetched into L2 while this one is multiplied, a few rows per x tile.
      int64_t next_nb = nb + NT_NB, next_kc = kc;
      if (next_nb >= n1) next_nb = n0, next_kc = kc + NT_KC;
      const int64_t next_rows = next_kc < p.K ? (n1 - next_nb < NT_NB ? n1 - next_nb : NT_NB) : 0;
      const int64_t next_bytes = Src::bytes(p.K - next_kc < NT_KC ? p.K - next_kc : NT_KC);
      for (int64_t m = 0, tile = 0; m < p.M; m += NT_MR, ++tile) {
        for (int64_t r = next_rows * tile / mtiles; r < next_rows * (tile + 1) / mtiles; ++r) {
          const char* row = src.at(next_nb + r, next_kc);
          for (int64_t b = 0; b < next_bytes; b += 64) _mm_prefetch(row + b, _MM_HINT_T1);
        }
        const int mr = static_cast<int>(p.M - m < NT_MR ? p.M - m : int64_t(NT_MR));
        const float* xm = p.x + m * p.ldx + kc;
        float* om = p.out + m * p.N + nb;
        for (int64_t j = 0; j < nbl; j += NT_NR) {
          const int nr = static_cast<int>(nbl - j < NT_NR ? nbl - j : int64_t(NT_NR));
          DotFn f = (mr == NT_MR && nr == NT_NR) ? full : nt_tile(mr, nr);
          f(xm, p.ldx, buf + j * ldb, ldb, kl, om + j, p.N, kc > 0);
        }
      }
    }
  }
}

// ----------------------------------- nn layout, M <= 8 (decode) -------------------------------------
// out[m, n] += x[m, k..k+KB) · W[k..k+KB, n] for blocks of KB weight rows: every weight row is streamed once
// (NV vectors = whole cache lines per step), out stays in cache between blocks.
constexpr int NN_KB = 8;

template <int M, int NV, typename WT>
static inline void nn_decode_step(const float* x, int64_t ldx, const WT* w, int64_t N, int kb, float* out,
                                  bool first) {
  V acc[M][NV];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[m][v] = first ? vzero() : vload(out + m * N + v * VW);
  for (int kk = 0; kk < kb; ++kk) {
    V wv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) wv[v] = vloadw(w + kk * N + v * VW);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      V a = vbcast(x + m * ldx + kk);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[m][v] = vfma(a, wv[v], acc[m][v]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) vstore(out + m * N + v * VW, acc[m][v]);
}

template <int M, typename WT>
static void nn_decode_part(const Problem& p, int chunk, int chunks) {
  constexpr int NV = (VW == 16 || M <= 6) ? 2 : 1;  // registers: M * NV accumulators + NV weights + 1
  int64_t n0, n1;
  vg::split_range(p.N, NV * VW, chunk, chunks, &n0, &n1);
  const WT* w = static_cast<const WT*>(p.w);
  const float* x = p.x;
  const int64_t K = p.K, N = p.N, ldx = p.ldx;
  for (int64_t k0 = 0; k0 < K; k0 += NN_KB) {
    const int kb = static_cast<int>(K - k0 < NN_KB ? K - k0 : int64_t(NN_KB));
    const float* xk = x + k0;
    const WT* wk = w + k0 * N;
    int64_t n = n0;
    if (kb == NN_KB) {
      for (; n + NV * VW <= n1; n += NV * VW) nn_decode_step<M, NV, WT>(xk, ldx, wk + n, N, NN_KB, p.out + n, k0 == 0);
    }
    for (; n + NV * VW <= n1; n += NV * VW) nn_decode_step<M, NV, WT>(xk, ldx, wk + n, N, kb, p.out + n, k0 == 0);
    for (; n + VW <= n1; n += VW) nn_decode_step<M, 1, WT>(xk, ldx, wk + n, N, kb, p.out + n, k0 == 0);
    for (; n < n1; ++n) {
      for (int m = 0; m < M; ++m) {
        float s = k0 ? p.out[m * N + n] : 0.f;
        for (int kk = 0; kk < kb; ++kk) s += xk[m * ldx + kk] * tof(wk[kk * N + n]);
        p.out[m * N + n] = s;
      }
    }
  }
}

template <typename WT>
static void nn_decode_job(void* ctx, int chunk, int chunks) {
  const Problem& p = static_cast<Ctx*>(ctx)->p;
  with_rows(p.M, [&](auto m) { nn_decode_part<decltype(m)::value, WT>(p, chunk, chunks); });
}

// ----------------------------------- nn layout, M > 8 (prefill) -------------------------------------
// Weight blocks of KC rows x NC columns packed (fp32) into NR-column panels [KC][NR]; an MR x NR micro-tile
// of out accumulates broadcast(x) * panel rows.
constexpr int NN_NR = NN_NRV * VW;
constexpr int64_t NN_KC = 256, NN_NC = NN_NR * 16;

template <int MR>
static void nn_micro(const float* x, int64_t ldx, const float* panel, int64_t kl, float* out, int64_t ldo, int nr,
                     bool accumulate) {
  V acc[MR][NN_NRV];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NN_NRV; ++v) acc[m][v] = vzero();
  for (int64_t k = 0; k < kl; ++k) {
    V b[NN_NRV];
#pragma GCC unroll 4
    for (int v = 0; v < NN_NRV; ++v) b[v] = vload(panel + k * NN_NR + v * VW);
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      V a = vbcast(x + m * ldx + k);
#pragma GCC unroll 4
      for (int v = 0; v < NN_NRV; ++v) acc[m][v] = vfma(a, b[v], acc[m][v]);
    }
  }
  if (nr == NN_NR) {
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
      for (int v = 0; v < NN_NRV; ++v) {
        float* o = out + m * ldo + v * VW;
        vstore(o, accumulate ? vadd(vload(o), acc[m][v]) : acc[m][v]);
      }
  } else {  // the last panel's first nr columns (registers indexed by constants only, so none is spilled)
    alignas(64) float tmp[MR][NN_NR];
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
      for (int v = 0; v < NN_NRV; ++v) vstore(tmp[m] + v * VW, acc[m][v]);
    for (int m = 0; m < MR; ++m) {
      float* o = out + m * ldo;
      for (int c = 0; c < nr; ++c) o[c] = accumulate ? o[c] + tmp[m][c] : tmp[m][c];
    }
  }
}

typedef void (*MicroFn)(const float*, int64_t, const float*, int64_t, float*, int64_t, int, bool);

template <int MR>
static void fill_micro(MicroFn* table) {
  table[MR] = &nn_micro<MR>;
  if constexpr (MR > 1) fill_micro<MR - 1>(table);
}

template <typename WT>
static void nn_prefill_job(void* ctx, int chunk, int chunks) {
  const Problem& p = static_cast<Ctx*>(ctx)->p;
  MicroFn micro[NN_MR + 1];
  fill_micro<NN_MR>(micro);
  int64_t n0, n1;
  vg::split_range(p.N, NN_NR, chunk, chunks, &n0, &n1);
  const WT* w = static_cast<const WT*>(p.w);
  float* packed = vg::scratch(1, static_cast<size_t>(NN_KC) * NN_NC);
  if (!packed) {
    static_cast<Ctx*>(ctx)->failed.store(1);
    return;
  }
  for (int64_t nc = n0; nc < n1; nc += NN_NC) {
    const int64_t ncl = n1 - nc < NN_NC ? n1 - nc : NN_NC;
    const int64_t npanels = (ncl + NN_NR - 1) / NN_NR;
    for (int64_t kc = 0; kc < p.K; kc += NN_KC) {
      const int64_t kl = p.K - kc < NN_KC ? p.K - kc : NN_KC;
      for (int64_t j = 0; j < npanels; ++j) {  // pack: panel j = [kl][NN_NR], zero-padded past column ncl
        float* dst = packed + j * NN_KC * NN_NR;
        const int64_t c0 = j * NN_NR;
        const int64_t cols = ncl - c0 < NN_NR ? ncl - c0 : int64_t(NN_NR);
        for (int64_t k = 0; k < kl; ++k) {
          const WT* src = w + (kc + k) * p.N + nc + c0;
          float* d = dst + k * NN_NR;
          if (cols == NN_NR) {
#pragma GCC unroll 4
            for (int v = 0; v < NN_NRV; ++v) vstore(d + v * VW, vloadw(src + v * VW));
          } else {
            int64_t c = 0;
            for (; c < cols; ++c) d[c] = tof(src[c]);
            for (; c < NN_NR; ++c) d[c] = 0.f;
          }
        }
      }
      for (int64_t m = 0; m < p.M; m += NN_MR) {
        const int mr = static_cast<int>(p.M - m < NN_MR ? p.M - m : int64_t(NN_MR));
        const float* xm = p.x + m * p.ldx + kc;
        for (int64_t j = 0; j < npanels; ++j) {
          const int nr = static_cast<int>(ncl - j * NN_NR < NN_NR ? ncl - j * NN_NR : int64_t(NN_NR));
          micro[mr](xm, p.ldx, packed + j * NN_KC * NN_NR, kl, p.out + m * p.N + nc + j * NN_NR, p.N, nr, kc > 0);
        }
      }
    }
  }
}

// ------------------------------------------- dispatch ----------------------------------------------
// Copies x into the calling thread's scratch at a stride that spreads its rows over L1 sets (M >= 2), int4's in
// permuted column order (always). False when no buffer could be had.
static bool stage_x(Problem* p) {
  const bool permute = p->bits == 4;
  if (p->M < 2 && !permute) return true;
  const int64_t ldx = vg::padded_stride(p->K);
  float* xb = vg::scratch(0, static_cast<size_t>(p->M) * ldx);
  if (!xb) return false;
  const int64_t kv = permute ? p->K - p->K % (2 * VW) : 0;
  for (int64_t m = 0; m < p->M; ++m) {
    const float* s = p->x + m * p->K;
    float* d = xb + m * ldx;
    for (int64_t k = 0; k < kv; k += 2 * VW) {
      for (int j = 0; j < VW; ++j) {
        d[k + j] = s[k + 2 * j];
        d[k + VW + j] = s[k + 2 * j + 1];
      }
    }
    memcpy(d + kv, s + kv, sizeof(float) * (p->K - kv));
  }
  p->x = xb;
  p->ldx = ldx;
  return true;
}

// Float weights in either layout, or quantized ones ([N, K·bits/8], nt layout only: decode tiles on the integers
// for M <= 8 with the scales applied to the outputs, the nt prefill on blocks dequantized into fp32 otherwise).
static int linear(const Problem& p, bool nt) {
  if (p.M == 0 || p.N == 0) return 0;
  if (p.K == 0) {
    memset(p.out, 0, sizeof(float) * p.M * p.N);
    return 0;
  }
  Ctx ctx;
  ctx.p = p;
#ifdef VG_VNNI
  const bool staged = p.bits && p.M <= 8 ? stage_xq(&ctx.p) : stage_x(&ctx.p);
#else
  const bool staged = stage_x(&ctx.p);
#endif
  if (!staged) return 2;
  const double flops = 2.0 * p.M * p.N * p.K;
  vg::JobFn fn;
  int64_t units;  // smallest pieces of N worth giving a thread
  if (p.M <= 8) {
    if (p.bits) {
      fn = p.bits == 8 ? &q_decode_job<8> : &q_decode_job<4>;
      units = p.N / 16;
    } else if (nt) {
      fn = p.w_half ? &nt_decode_job<uint16_t> : &nt_decode_job<float>;
      units = p.N / 16;
    } else {
      fn = p.w_half ? &nn_decode_job<uint16_t> : &nn_decode_job<float>;
      units = p.N / (2 * VW);
    }
  } else if (p.bits) {
    fn = p.bits == 8 ? &nt_prefill_job<QuantRows<8>> : &nt_prefill_job<QuantRows<4>>;
    units = p.N / NT_NR;
  } else if (nt) {
    fn = p.w_half ? &nt_prefill_job<FloatRows<uint16_t>> : &nt_prefill_job<FloatRows<float>>;
    units = p.N / NT_NR;
  } else {
    fn = p.w_half ? &nn_prefill_job<uint16_t> : &nn_prefill_job<float>;
    units = p.N / NN_NR;
  }
  vg::pool()->run(vg::chunks_for(flops, units), fn, &ctx);
  return ctx.failed.load() ? 2 : 0;
}

}  // namespace VG_NS

#endif  // VG_KERNEL_BODY
