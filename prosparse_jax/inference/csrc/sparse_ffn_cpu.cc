// Sparse FFN rows for XLA:CPU: out_BxD = sum over the active neurons i of x1[b, i] * W_down[i, :].
//
// ProSparse (arXiv 2402.13516) §4.3 S2 + S3 on a CPU: the gate projection (dense, in XLA) decided which neurons are
// active (active_F); this custom call reads only their rows of W_up^T [F, D] (up_i = x . W_up^T[i], then
// x1 = coeff * up, or coeff * relu(up) for dReLU, coeff = act(gate)) and of W_down [F, D], in place (no gathered
// copy), a few neurons at a time, their W_down rows right after their W_up^T rows. When x1 is already known (the
// neuron-norm mode, CETT -- Sparsing Law §4.1; read_up=false) coeff is x1 and only the W_down rows are read. A
// neuron whose x1 is zero on every row skips its W_down row.
//
// Memory: each row is a contiguous D-float stream. The rows of kGroup neurons stream together (one load of x serves
// kGroup rows of W_up^T, one load / store of the accumulator kGroup rows of W_down), and while they stream the rows of
// the next group are prefetched line by line, so they are in flight when the current ones end (both gains are in
// docs/benchmarks.md).
//
// Threads: the active list (built here from active_F) is cut into chunks of kChunk neurons, claimed through an
// atomic counter by the calling thread and by tasks scheduled on XLA's intra-op thread pool; each participant
// accumulates into its own [B, D] slot (the caller into out), and the caller sums the slots once every claimed
// chunk is done. The caller never waits for a task to *start* (it may itself run on a pool thread): a task that
// starts after the caller took the last chunk finds nothing to do. The shared state is owned by a shared_ptr that
// each task holds, so a task starting after the handler returned touches no freed memory (only the chunk counter).
//
// Built and registered by prosparse_jax/inference/cpu_ffi.py.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kChunk = 32;   // active neurons per claimed unit of work (16-64 measured alike)
constexpr int kGroup = 4;        // neurons whose rows stream together (one load of x / acc serves kGroup rows)
constexpr int64_t kAhead = 4;    // prefetch the rows of the neurons this many places later (the next group)
constexpr int64_t kMaxRows = 4;  // batch rows per pass over a group's rows (more rows: several passes)
constexpr int64_t kLane = 16;    // floats per vector
// Row bytes per participating thread below which another thread costs (waking it) more than it saves.
constexpr int64_t kMinBytesPerThread = 1 << 20;
static_assert(kGroup == 4, "DownRows dispatches n = 1..4");

// 16 floats with unaligned loads / stores (rows start anywhere), allowed to alias float.
typedef float V16 __attribute__((vector_size(64), aligned(4), may_alias));

inline V16 Load(const float* p) { return *reinterpret_cast<const V16*>(p); }
inline void Store(float* p, V16 v) { *reinterpret_cast<V16*>(p) = v; }

inline float HorizontalSum(V16 v) {
  float s = 0.0f;
  for (int k = 0; k < kLane; ++k) s += v[k];
  return s;
}

// Everything one call shares with its tasks. The input pointers are only dereferenced for a claimed chunk, and the
// handler returns only after every claimed chunk is done, so they never dangle when used.
struct Work {
  const float* x_BxD;
  const float* coeff_BxF;
  const float* w_up_FxD;
  const float* w_down_FxD;
  int64_t B, D, F, n_chunks;
  bool read_up, drelu;
  std::vector<int32_t> idx;           // the active neurons, ascending
  std::atomic<int64_t> next_chunk{0};
  std::atomic<int64_t> done_chunks{0};
  std::vector<float> slots;           // one [B, D] accumulator per task
  std::unique_ptr<bool[]> slot_used;  // set by its task before its first chunk is counted done
};

// x1[n][b] for neurons i[0..N-1] and rows b0 .. b0 + NB - 1: coeff, or coeff * (x . W_up^T[i]) (relu'd for
// dReLU). The N neurons' rows stream together: one load of x serves N rows of W_up^T.
template <int N, int NB>
inline void NeuronsX1(const Work& w, const int64_t* i, int64_t b0, const int64_t* ahead, float (*x1)[NB]) {
  const int64_t D = w.D;
  if (!w.read_up) {
    for (int n = 0; n < N; ++n) {
      for (int b = 0; b < NB; ++b) x1[n][b] = w.coeff_BxF[(b0 + b) * w.F + i[n]];
    }
    return;
  }
  const float* up[N];
  const float* pf[N];
  for (int n = 0; n < N; ++n) {
    up[n] = w.w_up_FxD + i[n] * D;
    pf[n] = w.w_up_FxD + ahead[n] * D;
  }
  const float* x = w.x_BxD + b0 * D;
  V16 s[N][NB] = {};
  int64_t d = 0;
  for (; d + kLane <= D; d += kLane) {
    V16 u[N];
    for (int n = 0; n < N; ++n) {
      u[n] = Load(up[n] + d);
      __builtin_prefetch(pf[n] + d);
    }
    for (int b = 0; b < NB; ++b) {
      const V16 xv = Load(x + b * D + d);
      for (int n = 0; n < N; ++n) s[n][b] += xv * u[n];
    }
  }
  for (int n = 0; n < N; ++n) {
    for (int b = 0; b < NB; ++b) {
      float t = HorizontalSum(s[n][b]);
      for (int64_t e = d; e < D; ++e) t += x[b * D + e] * up[n][e];
      if (w.drelu) t = std::max(t, 0.0f);
      x1[n][b] = w.coeff_BxF[(b0 + b) * w.F + i[n]] * t;
    }
  }
}

// acc[b0 + b, :] += sum_n x1[n][b] * W_down[i[n], :] for NB rows: one load / store of acc per N rows of W_down.
template <int N, int NB>
inline void NeuronsDown(const Work& w, const int64_t* i, int64_t b0, const float (*x1)[NB], const int64_t* ahead,
                        float* acc_BxD) {
  const int64_t D = w.D;
  const float* down[N];
  const float* pf[N];
  for (int n = 0; n < N; ++n) {
    down[n] = w.w_down_FxD + i[n] * D;
    pf[n] = w.w_down_FxD + ahead[n] * D;
  }
  float* acc = acc_BxD + b0 * D;
  int64_t d = 0;
  for (; d + kLane <= D; d += kLane) {
    V16 v[N];
    for (int n = 0; n < N; ++n) {
      v[n] = Load(down[n] + d);
      __builtin_prefetch(pf[n] + d);
    }
    for (int b = 0; b < NB; ++b) {
      V16 a = Load(acc + b * D + d);
      for (int n = 0; n < N; ++n) a += x1[n][b] * v[n];
      Store(acc + b * D + d, a);
    }
  }
  for (; d < D; ++d) {
    for (int b = 0; b < NB; ++b) {
      for (int n = 0; n < N; ++n) acc[b * D + d] += x1[n][b] * down[n][d];
    }
  }
}

// The W_down rows of the n (1..kGroup) neurons in i[] (nonzero x1), with the row loop unrolled per n.
template <int NB>
inline void DownRows(const Work& w, int n, const int64_t* i, int64_t b0, const float (*x1)[NB], const int64_t* ahead,
                     float* acc_BxD) {
  switch (n) {
    case 1: return NeuronsDown<1, NB>(w, i, b0, x1, ahead, acc_BxD);
    case 2: return NeuronsDown<2, NB>(w, i, b0, x1, ahead, acc_BxD);
    case 3: return NeuronsDown<3, NB>(w, i, b0, x1, ahead, acc_BxD);
    default: return NeuronsDown<4, NB>(w, i, b0, x1, ahead, acc_BxD);
  }
}

// Neurons i[0..N-1] for rows b0 .. b0 + NB - 1, prefetching the rows of neurons ahead[0..N-1]. A neuron whose x1
// is zero on every row (dReLU's relu(up)) does not read its W_down row.
template <int N, int NB>
inline void Neurons(const Work& w, const int64_t* i, const int64_t* ahead, int64_t b0, float* acc_BxD) {
  float x1[N][NB];
  NeuronsX1<N, NB>(w, i, b0, ahead, x1);
  int64_t kept_i[N];
  float kept_x1[N][NB];
  int n_kept = 0;
  for (int n = 0; n < N; ++n) {
    bool any = false;
    for (int b = 0; b < NB; ++b) any |= x1[n][b] != 0.0f;
    if (!any) continue;
    kept_i[n_kept] = i[n];
    std::copy(x1[n], x1[n] + NB, kept_x1[n_kept]);
    ++n_kept;
  }
  if (n_kept > 0) DownRows<NB>(w, n_kept, kept_i, b0, kept_x1, ahead, acc_BxD);
}

// The row loops unrolled per batch size nb in 1..kMaxRows.
template <int N>
inline void NeuronRows(const Work& w, const int64_t* i, const int64_t* ahead, int64_t b0, int64_t nb,
                       float* acc_BxD) {
  switch (nb) {
    case 1: return Neurons<N, 1>(w, i, ahead, b0, acc_BxD);
    case 2: return Neurons<N, 2>(w, i, ahead, b0, acc_BxD);
    case 3: return Neurons<N, 3>(w, i, ahead, b0, acc_BxD);
    default: return Neurons<N, 4>(w, i, ahead, b0, acc_BxD);
  }
}

// Neurons idx[k .. k + N - 1], for every group of kMaxRows batch rows.
template <int N>
inline void Group(const Work& w, int64_t k, float* acc_BxD) {
  const int64_t last = static_cast<int64_t>(w.idx.size()) - 1;
  int64_t i[N], ahead[N];
  for (int n = 0; n < N; ++n) {
    i[n] = w.idx[k + n];
    ahead[n] = w.idx[std::min(k + n + kAhead, last)];
  }
  for (int64_t b0 = 0; b0 < w.B; b0 += kMaxRows) NeuronRows<N>(w, i, ahead, b0, std::min(kMaxRows, w.B - b0), acc_BxD);
}

// The neurons of chunk c, kGroup at a time (then one by one).
void RunChunk(const Work& w, int64_t c, float* acc_BxD) {
  const int64_t end = std::min(static_cast<int64_t>(w.idx.size()), (c + 1) * kChunk);
  int64_t k = c * kChunk;
  for (; k + kGroup <= end; k += kGroup) Group<kGroup>(w, k, acc_BxD);
  for (; k < end; ++k) Group<1>(w, k, acc_BxD);
}

// Claims chunks until none is left. `acc_BxD` is zeroed (and `*used` set) before the first claimed chunk.
void ClaimChunks(Work& w, float* acc_BxD, bool* used) {
  for (;;) {
    const int64_t c = w.next_chunk.fetch_add(1, std::memory_order_relaxed);
    if (c >= w.n_chunks) return;
    if (!*used) {
      std::fill(acc_BxD, acc_BxD + w.B * w.D, 0.0f);
      *used = true;
    }
    RunChunk(w, c, acc_BxD);
    w.done_chunks.fetch_add(1, std::memory_order_release);
  }
}

std::string Dims(ffi::AnyBuffer::Dimensions d) {
  std::string s = "[";
  for (size_t k = 0; k < d.size(); ++k) s += (k ? ", " : "") + std::to_string(d[k]);
  return s + "]";
}

ffi::Error CheckShapes(ffi::AnyBuffer::Dimensions x, ffi::AnyBuffer::Dimensions coeff,
                       ffi::AnyBuffer::Dimensions active, ffi::AnyBuffer::Dimensions up,
                       ffi::AnyBuffer::Dimensions down, ffi::AnyBuffer::Dimensions out, bool read_up) {
  const std::string got = "; got x_BxD " + Dims(x) + ", coeff_BxF " + Dims(coeff) + ", active_F " + Dims(active) +
                          ", w_up_FxD " + Dims(up) + ", w_down_FxD " + Dims(down);
  if (x.size() != 2 || coeff.size() != 2 || active.size() != 1 || up.size() != 2 || down.size() != 2 ||
      out.size() != 2) {
    return ffi::Error::InvalidArgument(
        "sparse_ffn_cpu: x_BxD, coeff_BxF, w_up_FxD, w_down_FxD must be 2-D and active_F 1-D" + got);
  }
  const int64_t B = x[0], D = x[1], F = down[0];
  if (coeff[0] != B || coeff[1] != F || active[0] != F || down[1] != D || out[0] != B || out[1] != D ||
      (read_up && (up[0] != F || up[1] != D))) {
    return ffi::Error::InvalidArgument(
        "sparse_ffn_cpu: shapes disagree (want coeff [B, F], active [F], w_up / w_down [F, D] with x [B, D])" + got);
  }
  return ffi::Error::Success();
}

// Schedules up to num_threads - 1 tasks (fewer for little work), claims chunks itself, waits for the claimed chunks,
// sums the slots.
void RunParallel(ffi::ThreadPool& pool, const std::shared_ptr<Work>& w, float* out_BxD) {
  const int64_t BD = w->B * w->D;
  const int64_t row_bytes = static_cast<int64_t>(w->idx.size()) * w->D * sizeof(float) * (w->read_up ? 2 : 1);
  const int64_t n_tasks = std::max<int64_t>(
      0, std::min({pool.num_threads() - 1, row_bytes / kMinBytesPerThread - 1, w->n_chunks - 1}));
  w->slots.resize(n_tasks * BD);
  w->slot_used.reset(new bool[n_tasks]());
  for (int64_t t = 0; t < n_tasks; ++t) {
    pool.Schedule([w, t, BD] { ClaimChunks(*w, w->slots.data() + t * BD, &w->slot_used[t]); });
  }
  bool caller_used = true;  // out is already zero
  ClaimChunks(*w, out_BxD, &caller_used);
  while (w->done_chunks.load(std::memory_order_acquire) < w->n_chunks) std::this_thread::yield();
  for (int64_t t = 0; t < n_tasks; ++t) {
    if (!w->slot_used[t]) continue;
    const float* slot = w->slots.data() + t * BD;
    for (int64_t k = 0; k < BD; ++k) out_BxD[k] += slot[k];
  }
}

ffi::Error SparseFfnDownImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> coeff,
                             ffi::Buffer<ffi::PRED> active, ffi::Buffer<ffi::F32> w_up, ffi::Buffer<ffi::F32> w_down,
                             ffi::Result<ffi::Buffer<ffi::F32>> out, bool read_up, bool drelu) {
  if (ffi::Error e = CheckShapes(x.dimensions(), coeff.dimensions(), active.dimensions(), w_up.dimensions(),
                                 w_down.dimensions(), out->dimensions(), read_up);
      e.failure()) {
    return e;
  }
  auto w = std::make_shared<Work>();
  w->B = x.dimensions()[0];
  w->D = x.dimensions()[1];
  w->F = w_down.dimensions()[0];
  w->x_BxD = x.typed_data();
  w->coeff_BxF = coeff.typed_data();
  w->w_up_FxD = w_up.typed_data();
  w->w_down_FxD = w_down.typed_data();
  w->read_up = read_up;
  w->drelu = drelu;
  const bool* active_F = active.typed_data();
  for (int64_t i = 0; i < w->F; ++i) {
    if (active_F[i]) w->idx.push_back(static_cast<int32_t>(i));
  }
  w->n_chunks = (static_cast<int64_t>(w->idx.size()) + kChunk - 1) / kChunk;
  float* out_BxD = out->typed_data();
  std::fill(out_BxD, out_BxD + w->B * w->D, 0.0f);
  if (w->n_chunks > 0 && w->B * w->D > 0) RunParallel(pool, w, out_BxD);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ProsparseSparseFfnDown, SparseFfnDownImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x_BxD
                                  .Arg<ffi::Buffer<ffi::F32>>()   // coeff_BxF
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // active_F
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_up_FxD
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_down_FxD
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out_BxD
                                  .Attr<bool>("read_up")
                                  .Attr<bool>("drelu"));
