// Sparse FFN rows for XLA:CPU: two custom calls sharing one row-streaming core and one work-stealing thread loop.
//
// ProsparseSparseFfnDown: out_BxD = sum over the active neurons i of x1[b, i] * W_down[i, :]. ProSparse
// (arXiv 2402.13516) §4.3 S2 + S3 on a CPU: the active neurons are known (active_F); the call reads only their rows
// of W_up^T [F, D] (up_i = x . W_up^T[i], then x1 = coeff * up, or coeff * relu(up) for dReLU, coeff = act(gate))
// and of W_down [F, D], in place (no gathered copy), a few neurons at a time, their W_down rows right after their
// W_up^T rows. When x1 is already known (the neuron-norm mode, CETT -- Sparsing Law §4.1; read_up=false) coeff is
// x1 and only the W_down rows are read. A neuron whose x1 is zero on every row skips its W_down row.
//
// ProsparsePredictGate: the activation predictor's second layer and the gate rows it selects (PowerInfer, Deja Vu;
// formula in prosparse_jax/predictor/core.py). Given h = relu(x W1) [B, R] (computed in XLA), the call reads the rows
// of W2 [R, F] whose h is non-zero on some batch row (a ReLU hidden layer: about half of them), so logits = h W2 + b2,
// predicted_F = any row's logit > threshold; then the rows of W_gate^T [F, D] of the predicted neurons only, writing
// gate_BxF = x . W_gate^T[i] for them and 0 elsewhere. XLA applies the activation (one source for its formula) and
// passes act(gate) to ProsparseSparseFfnDown.
//
// Memory: each row is a contiguous stream. The rows of kGroup neurons stream together (one load of x serves kGroup
// dot-product rows, one load / store of the accumulator kGroup accumulated rows), and while they stream the rows of
// the next group are prefetched line by line, so they are in flight when the current ones end (docs/benchmarks.md).
//
// Threads (RunLoop): the row list is cut into chunks of kChunk rows, claimed through an atomic counter by the calling
// thread and by tasks scheduled on XLA's intra-op thread pool. The caller never waits for a task to *start* (it may
// itself run on a pool thread): a task that starts after the caller took the last chunk finds nothing to do. Nor does
// it wait long for a task that was preempted while holding a chunk (another process busy on the machine): a task
// computes its chunk into its own buffer and publishes it only if it wins the chunk (a compare-and-swap); once the
// caller has no chunk left to claim and a task's chunk is late (twice the caller's own time per chunk), the caller
// computes that chunk itself and wins it, so no result the call needs is held by a sleeping thread. A task that loses
// drops its result. Everything a late task may still read or write is owned by shared_ptrs it holds (the call's x,
// coefficients and row lists are copies), except the weight rows, which must outlive the call by that task's last
// group of rows (model weights do: they are the decode step's parameters).
//
// Built and registered by prosparse_jax/inference/cpu_ffi.py.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kChunk = 32;   // rows per claimed unit of work (16-64 measured alike)
constexpr int kGroup = 4;        // rows that stream together (one load of x / acc serves kGroup rows)
constexpr int64_t kAhead = 4;    // prefetch the rows this many places later (the next group)
constexpr int64_t kMaxRows = 4;  // batch rows per pass over a group's rows (more rows: several passes)
constexpr int64_t kLane = 16;    // floats per vector
// Row bytes per participating thread below which another thread costs (waking it) more than it saves.
constexpr int64_t kMinBytesPerThread = 1 << 20;
// How long the caller waits for a late chunk, in units of its own mean time per chunk, before computing it itself.
constexpr int64_t kPatienceChunks = 2;
// The caller's patience when it ran no chunk of its own (no time per chunk measured).
constexpr std::chrono::microseconds kDefaultPatience{100};
static_assert(kGroup == 4, "the row loops dispatch n = 1..4");

// 16 floats with unaligned loads / stores (rows start anywhere), allowed to alias float.
typedef float V16 __attribute__((vector_size(64), aligned(4), may_alias));

inline V16 Load(const float* p) { return *reinterpret_cast<const V16*>(p); }
inline void Store(float* p, V16 v) { *reinterpret_cast<V16*>(p) = v; }

inline float HorizontalSum(V16 v) {
  float s = 0.0f;
  for (int k = 0; k < kLane; ++k) s += v[k];
  return s;
}

// What one pass over a row list reads. Owned by a shared_ptr that every task of the pass holds.
struct Work {
  int64_t B = 0, D = 0;            // batch rows; floats per weight row (and per row of x when rows are dotted)
  std::vector<float> x;            // x_BxD, copied from the call's input
  std::vector<int32_t> idx;        // the rows to read, ascending
  std::vector<float> coeff;        // [idx.size(), B]: act(gate) (read_up), else x1 / the predictor's h
  const float* w_dot = nullptr;    // rows dotted with x: W_up^T, or W_gate^T (DotRows); [F, D]
  const float* w_acc = nullptr;    // rows accumulated: W_down, or the predictor's W2 (then D = F)
  bool read_up = false, drelu = false;
};

// s[n][b] = x[b0 + b] . rows[i[n]] for N rows and NB batch rows; prefetches rows[ahead[n]].
template <int N, int NB>
inline void Dots(const Work& w, const int64_t* i, int64_t b0, const int64_t* ahead, float (*out)[NB]) {
  const int64_t D = w.D;
  const float* row[N];
  const float* pf[N];
  for (int n = 0; n < N; ++n) {
    row[n] = w.w_dot + i[n] * D;
    pf[n] = w.w_dot + ahead[n] * D;
  }
  const float* x = w.x.data() + b0 * D;
  V16 s[N][NB] = {};
  int64_t d = 0;
  for (; d + kLane <= D; d += kLane) {
    V16 u[N];
    for (int n = 0; n < N; ++n) {
      u[n] = Load(row[n] + d);
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
      for (int64_t e = d; e < D; ++e) t += x[b * D + e] * row[n][e];
      out[n][b] = t;
    }
  }
}

// x1[n][b] for the rows at positions k .. k + N - 1 of idx and batch rows b0 .. b0 + NB - 1: coeff, or
// coeff * (x . W_up^T[i]) (relu'd for dReLU).
template <int N, int NB>
inline void NeuronsX1(const Work& w, int64_t k, const int64_t* i, int64_t b0, const int64_t* ahead, float (*x1)[NB]) {
  const float* c = w.coeff.data() + k * w.B + b0;
  if (!w.read_up) {
    for (int n = 0; n < N; ++n) {
      for (int b = 0; b < NB; ++b) x1[n][b] = c[n * w.B + b];
    }
    return;
  }
  Dots<N, NB>(w, i, b0, ahead, x1);
  for (int n = 0; n < N; ++n) {
    for (int b = 0; b < NB; ++b) x1[n][b] = c[n * w.B + b] * (w.drelu ? std::max(x1[n][b], 0.0f) : x1[n][b]);
  }
}

// acc[b0 + b, :] += sum_n x1[n][b] * rows[i[n], :] for NB rows: one load / store of acc per N accumulated rows.
template <int N, int NB>
inline void NeuronsDown(const Work& w, const int64_t* i, int64_t b0, const float (*x1)[NB], const int64_t* ahead,
                        float* acc_BxD) {
  const int64_t D = w.D;
  const float* down[N];
  const float* pf[N];
  for (int n = 0; n < N; ++n) {
    down[n] = w.w_acc + i[n] * D;
    pf[n] = w.w_acc + ahead[n] * D;
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

// The accumulated rows of the n (1..kGroup) neurons in i[] (nonzero x1), with the row loop unrolled per n.
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

// Neurons at positions k .. k + N - 1 for batch rows b0 .. b0 + NB - 1, prefetching the rows of ahead[0..N-1]. A
// neuron whose x1 is zero on every row (dReLU's relu(up)) does not read its accumulated row.
template <int N, int NB>
inline void Neurons(const Work& w, int64_t k, const int64_t* i, const int64_t* ahead, int64_t b0, float* acc_BxD) {
  float x1[N][NB];
  NeuronsX1<N, NB>(w, k, i, b0, ahead, x1);
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

// The dot products of the rows at positions k .. k + N - 1 with batch rows b0 .. b0 + NB - 1, into
// block[(k - k0 + n) * B + b0 + b] (k0: the chunk's first position).
template <int N, int NB>
inline void DotRows(const Work& w, int64_t k, int64_t k0, const int64_t* i, const int64_t* ahead, int64_t b0,
                    float* block) {
  float s[N][NB];
  Dots<N, NB>(w, i, b0, ahead, s);
  for (int n = 0; n < N; ++n) {
    for (int b = 0; b < NB; ++b) block[(k - k0 + n) * w.B + b0 + b] = s[n][b];
  }
}

enum class Pass { kAccumulate, kDot };

// One group of rows for NB batch rows: accumulated (kAccumulate) or dotted (kDot).
template <Pass P, int N, int NB>
inline void RowsNB(const Work& w, int64_t k, int64_t k0, const int64_t* i, const int64_t* ahead, int64_t b0,
                   float* acc) {
  if constexpr (P == Pass::kDot) {
    DotRows<N, NB>(w, k, k0, i, ahead, b0, acc);
  } else {
    Neurons<N, NB>(w, k, i, ahead, b0, acc);
  }
}

// The row loops unrolled per batch size nb in 1..kMaxRows.
template <Pass P, int N>
inline void Rows(const Work& w, int64_t k, int64_t k0, const int64_t* i, const int64_t* ahead, int64_t b0, int64_t nb,
                 float* acc) {
  switch (nb) {
    case 1: return RowsNB<P, N, 1>(w, k, k0, i, ahead, b0, acc);
    case 2: return RowsNB<P, N, 2>(w, k, k0, i, ahead, b0, acc);
    case 3: return RowsNB<P, N, 3>(w, k, k0, i, ahead, b0, acc);
    default: return RowsNB<P, N, 4>(w, k, k0, i, ahead, b0, acc);
  }
}

// Rows at positions k .. k + N - 1 of idx, for every group of kMaxRows batch rows.
template <Pass P, int N>
inline void Group(const Work& w, int64_t k, int64_t k0, float* acc) {
  const int64_t last = static_cast<int64_t>(w.idx.size()) - 1;
  int64_t i[N], ahead[N];
  for (int n = 0; n < N; ++n) {
    i[n] = w.idx[k + n];
    ahead[n] = w.idx[std::min(k + n + kAhead, last)];
  }
  for (int64_t b0 = 0; b0 < w.B; b0 += kMaxRows) Rows<P, N>(w, k, k0, i, ahead, b0, std::min(kMaxRows, w.B - b0), acc);
}

// The rows of chunk c, kGroup at a time (then one by one). kAccumulate: adds into acc [B, D]; kDot: writes the
// chunk's dot products into acc [kChunk, B].
template <Pass P>
void RunChunk(const Work& w, int64_t c, float* acc) {
  const int64_t k0 = c * kChunk;
  const int64_t end = std::min(static_cast<int64_t>(w.idx.size()), k0 + kChunk);
  int64_t k = k0;
  for (; k + kGroup <= end; k += kGroup) Group<P, kGroup>(w, k, k0, acc);
  for (; k < end; ++k) Group<P, 1>(w, k, k0, acc);
}

// ---------------------------------------------------------------------------------------------------------------
// The thread loop
// ---------------------------------------------------------------------------------------------------------------

// One parallel pass: n_chunks units of work, each computing a result of `width` floats that is either added into an
// accumulator (additive) or written to its own block dest + c * width.
struct Loop {
  std::function<void(int64_t, float*)> run;  // run(c, acc): chunk c into acc (additive: acc += ...)
  int64_t n_chunks = 0, width = 0;
  bool additive = true;
  float* dest = nullptr;  // not additive: the blocks; written only by a chunk's winner, before `folded` counts it
  std::vector<float> slots;               // additive: one [width] accumulator per task
  std::unique_ptr<bool[]> slot_used;      // a task's slot holds a result
  std::unique_ptr<std::atomic<bool>[]> won;  // chunk c's result is taken (by its claimer or by the caller)
  std::atomic<int64_t> next{0};           // the next chunk to claim
  std::atomic<int64_t> folded{0};         // chunks whose result is in an accumulator or in dest
};

// Adds (or copies) a won chunk's result into the task's slot / the caller's accumulator / its block.
void Fold(Loop& l, int64_t c, const float* result, float* acc, bool* used) {
  if (!l.additive) {
    std::memcpy(l.dest + c * l.width, result, l.width * sizeof(float));
  } else if (!*used) {
    std::memcpy(acc, result, l.width * sizeof(float));
    *used = true;
  } else {
    for (int64_t k = 0; k < l.width; ++k) acc[k] += result[k];
  }
}

// A pool task: claims chunks until none is left, each computed into its own buffer and folded only if won.
void TaskLoop(Loop& l, int64_t t) {
  std::vector<float> tmp(l.width);
  for (;;) {
    const int64_t c = l.next.fetch_add(1, std::memory_order_relaxed);
    if (c >= l.n_chunks) return;
    if (l.additive) std::fill(tmp.begin(), tmp.end(), 0.0f);
    l.run(c, tmp.data());
    bool expected = false;
    if (!l.won[c].compare_exchange_strong(expected, true, std::memory_order_acq_rel)) continue;  // the caller took it
    Fold(l, c, tmp.data(), l.additive ? l.slots.data() + t * l.width : nullptr, l.additive ? &l.slot_used[t] : nullptr);
    l.folded.fetch_add(1, std::memory_order_release);
  }
}

// The calling thread: claims chunks (computed in place: nobody takes a chunk from the caller), then waits for the
// tasks' chunks, computing any that is late itself; finally sums the tasks' slots into acc (additive).
void CallerLoop(Loop& l, float* acc, int64_t n_tasks) {
  using Clock = std::chrono::steady_clock;
  const auto t0 = Clock::now();
  int64_t mine = 0;
  for (;;) {
    const int64_t c = l.next.fetch_add(1, std::memory_order_relaxed);
    if (c >= l.n_chunks) break;
    l.run(c, l.additive ? acc : l.dest + c * l.width);
    l.won[c].store(true, std::memory_order_relaxed);
    l.folded.fetch_add(1, std::memory_order_release);
    ++mine;
  }
  if (l.folded.load(std::memory_order_acquire) < l.n_chunks) {
    const auto t1 = Clock::now();
    const auto patience = mine ? kPatienceChunks * (t1 - t0) / mine : Clock::duration(kDefaultPatience);
    std::vector<float> tmp;
    bool used = true;  // acc already holds the caller's chunks (or zeros)
    while (l.folded.load(std::memory_order_acquire) < l.n_chunks) {
      if (Clock::now() - t1 < patience) {
        std::this_thread::yield();
        continue;
      }
      for (int64_t c = 0; c < l.n_chunks; ++c) {  // a late task's chunks: compute them here
        if (l.won[c].load(std::memory_order_acquire)) continue;
        tmp.assign(l.width, 0.0f);
        l.run(c, tmp.data());
        bool expected = false;
        if (l.won[c].compare_exchange_strong(expected, true, std::memory_order_acq_rel)) {
          Fold(l, c, tmp.data(), acc, &used);
          l.folded.fetch_add(1, std::memory_order_release);
        }
      }
      std::this_thread::yield();  // every chunk is won: a task is folding its last result
    }
  }
  if (!l.additive) return;
  for (int64_t t = 0; t < n_tasks; ++t) {
    if (!l.slot_used[t]) continue;
    const float* slot = l.slots.data() + t * l.width;
    for (int64_t k = 0; k < l.width; ++k) acc[k] += slot[k];
  }
}

// Runs `run` over n_chunks chunks on the caller and up to num_threads - 1 pool tasks (fewer for little work:
// `row_bytes` in all). Additive: acc [width] must hold zeros (the result is added); else results go to dest.
void RunLoop(ffi::ThreadPool& pool, std::function<void(int64_t, float*)> run, int64_t n_chunks, int64_t width,
             bool additive, float* acc_or_dest, int64_t row_bytes) {
  if (n_chunks <= 0 || width <= 0) return;
  auto l = std::make_shared<Loop>();
  l->run = std::move(run);
  l->n_chunks = n_chunks;
  l->width = width;
  l->additive = additive;
  l->dest = additive ? nullptr : acc_or_dest;
  const int64_t n_tasks = std::max<int64_t>(
      0, std::min({static_cast<int64_t>(pool.num_threads()) - 1, row_bytes / kMinBytesPerThread - 1, n_chunks - 1}));
  if (additive) {
    l->slots.resize(n_tasks * width);
    l->slot_used.reset(new bool[n_tasks]());
  }
  l->won.reset(new std::atomic<bool>[n_chunks]);
  for (int64_t c = 0; c < n_chunks; ++c) l->won[c].store(false, std::memory_order_relaxed);
  for (int64_t t = 0; t < n_tasks; ++t) {
    pool.Schedule([l, t] { TaskLoop(*l, t); });
  }
  CallerLoop(*l, additive ? acc_or_dest : nullptr, n_tasks);
}

int64_t NumChunks(const Work& w) { return (static_cast<int64_t>(w.idx.size()) + kChunk - 1) / kChunk; }

// Accumulates the rows of w.idx into acc [B, D] (zeroed here) on the pool.
void Accumulate(ffi::ThreadPool& pool, const std::shared_ptr<Work>& w, float* acc_BxD) {
  std::fill(acc_BxD, acc_BxD + w->B * w->D, 0.0f);
  const int64_t row_bytes = static_cast<int64_t>(w->idx.size()) * w->D * sizeof(float) * (w->read_up ? 2 : 1);
  RunLoop(pool, [w](int64_t c, float* acc) { RunChunk<Pass::kAccumulate>(*w, c, acc); }, NumChunks(*w), w->B * w->D,
          true, acc_BxD, row_bytes);
}

// The dot products x . w_dot[idx[k]] on the pool: [idx.size(), B].
std::vector<float> DotAll(ffi::ThreadPool& pool, const std::shared_ptr<Work>& w) {
  const int64_t n_chunks = NumChunks(*w);
  std::vector<float> blocks(n_chunks * kChunk * w->B);
  const int64_t row_bytes = static_cast<int64_t>(w->idx.size()) * w->D * sizeof(float);
  RunLoop(pool, [w](int64_t c, float* block) { RunChunk<Pass::kDot>(*w, c, block); }, n_chunks, kChunk * w->B,
          false, blocks.data(), row_bytes);
  return blocks;
}

std::string Dims(ffi::AnyBuffer::Dimensions d) {
  std::string s = "[";
  for (size_t k = 0; k < d.size(); ++k) s += (k ? ", " : "") + std::to_string(d[k]);
  return s + "]";
}

// ---------------------------------------------------------------------------------------------------------------
// ProsparseSparseFfnDown
// ---------------------------------------------------------------------------------------------------------------

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

ffi::Error SparseFfnDownImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> coeff,
                             ffi::Buffer<ffi::PRED> active, ffi::Buffer<ffi::F32> w_up, ffi::Buffer<ffi::F32> w_down,
                             ffi::Result<ffi::Buffer<ffi::F32>> out, bool read_up, bool drelu) {
  if (ffi::Error e = CheckShapes(x.dimensions(), coeff.dimensions(), active.dimensions(), w_up.dimensions(),
                                 w_down.dimensions(), out->dimensions(), read_up);
      e.failure()) {
    return e;
  }
  auto w = std::make_shared<Work>();
  const int64_t B = x.dimensions()[0], D = x.dimensions()[1], F = w_down.dimensions()[0];
  w->B = B;
  w->D = D;
  w->w_dot = w_up.typed_data();
  w->w_acc = w_down.typed_data();
  w->read_up = read_up;
  w->drelu = drelu;
  const bool* active_F = active.typed_data();
  const float* coeff_BxF = coeff.typed_data();
  for (int64_t i = 0; i < F; ++i) {
    if (!active_F[i]) continue;
    w->idx.push_back(static_cast<int32_t>(i));
    for (int64_t b = 0; b < B; ++b) w->coeff.push_back(coeff_BxF[b * F + i]);
  }
  if (read_up) w->x.assign(x.typed_data(), x.typed_data() + B * D);
  float* out_BxD = out->typed_data();
  std::fill(out_BxD, out_BxD + B * D, 0.0f);
  if (!w->idx.empty() && B * D > 0) Accumulate(pool, w, out_BxD);
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------------------------
// ProsparsePredictGate
// ---------------------------------------------------------------------------------------------------------------

ffi::Error CheckPredictShapes(ffi::AnyBuffer::Dimensions x, ffi::AnyBuffer::Dimensions h,
                              ffi::AnyBuffer::Dimensions w2, ffi::AnyBuffer::Dimensions b2,
                              ffi::AnyBuffer::Dimensions threshold, ffi::AnyBuffer::Dimensions gate_w,
                              ffi::AnyBuffer::Dimensions gate, ffi::AnyBuffer::Dimensions predicted) {
  const std::string got = "; got x_BxD " + Dims(x) + ", h_BxR " + Dims(h) + ", w2_RxF " + Dims(w2) + ", b2_F " +
                          Dims(b2) + ", threshold " + Dims(threshold) + ", w_gate_FxD " + Dims(gate_w);
  if (x.size() != 2 || h.size() != 2 || w2.size() != 2 || b2.size() != 1 || gate_w.size() != 2 ||
      gate.size() != 2 || predicted.size() != 1) {
    return ffi::Error::InvalidArgument(
        "predict_gate_cpu: x_BxD, h_BxR, w2_RxF, w_gate_FxD must be 2-D and b2_F 1-D" + got);
  }
  int64_t n_threshold = 1;
  for (int64_t d : threshold) n_threshold *= d;
  const int64_t B = x[0], D = x[1], R = w2[0], F = w2[1];
  if (h[0] != B || h[1] != R || b2[0] != F || gate_w[0] != F || gate_w[1] != D || n_threshold != 1 ||
      gate[0] != B || gate[1] != F || predicted[0] != F) {
    return ffi::Error::InvalidArgument(
        "predict_gate_cpu: shapes disagree (want h [B, R], w2 [R, F], b2 [F], one threshold, w_gate_FxD [F, D] "
        "with x [B, D])" + got);
  }
  return ffi::Error::Success();
}

ffi::Error PredictGateImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> h,
                           ffi::Buffer<ffi::F32> w2, ffi::Buffer<ffi::F32> b2, ffi::Buffer<ffi::F32> threshold,
                           ffi::Buffer<ffi::F32> w_gate, ffi::Result<ffi::Buffer<ffi::F32>> gate,
                           ffi::Result<ffi::Buffer<ffi::PRED>> predicted) {
  if (ffi::Error e = CheckPredictShapes(x.dimensions(), h.dimensions(), w2.dimensions(), b2.dimensions(),
                                        threshold.dimensions(), w_gate.dimensions(), gate->dimensions(),
                                        predicted->dimensions());
      e.failure()) {
    return e;
  }
  const int64_t B = x.dimensions()[0], D = x.dimensions()[1], R = w2.dimensions()[0], F = w2.dimensions()[1];
  const float thr = threshold.typed_data()[0];
  float* gate_BxF = gate->typed_data();
  bool* pred_F = predicted->typed_data();
  // logits = h W2 + b2, reading the W2 rows whose h is non-zero on some batch row (accumulated in gate_BxF)
  auto logit_pass = std::make_shared<Work>();
  logit_pass->B = B;
  logit_pass->D = F;
  logit_pass->w_acc = w2.typed_data();
  const float* h_BxR = h.typed_data();
  for (int64_t r = 0; r < R; ++r) {
    bool any = false;
    for (int64_t b = 0; b < B; ++b) any |= h_BxR[b * R + r] != 0.0f;
    if (!any) continue;
    logit_pass->idx.push_back(static_cast<int32_t>(r));
    for (int64_t b = 0; b < B; ++b) logit_pass->coeff.push_back(h_BxR[b * R + r]);
  }
  std::fill(gate_BxF, gate_BxF + B * F, 0.0f);
  if (!logit_pass->idx.empty() && B * F > 0) Accumulate(pool, logit_pass, gate_BxF);
  // the predicted set: any batch row's logit above the threshold
  auto gate_pass = std::make_shared<Work>();
  gate_pass->B = B;
  gate_pass->D = D;
  gate_pass->w_dot = w_gate.typed_data();
  const float* b2_F = b2.typed_data();
  for (int64_t i = 0; i < F; ++i) {
    bool any = false;
    for (int64_t b = 0; b < B; ++b) any |= gate_BxF[b * F + i] + b2_F[i] > thr;
    pred_F[i] = any;
    if (any) gate_pass->idx.push_back(static_cast<int32_t>(i));
  }
  // the gate rows of the predicted neurons only
  std::fill(gate_BxF, gate_BxF + B * F, 0.0f);
  if (gate_pass->idx.empty() || B * D == 0) return ffi::Error::Success();
  gate_pass->x.assign(x.typed_data(), x.typed_data() + B * D);
  const std::vector<float> dots = DotAll(pool, gate_pass);
  for (size_t k = 0; k < gate_pass->idx.size(); ++k) {
    for (int64_t b = 0; b < B; ++b) gate_BxF[b * F + gate_pass->idx[k]] = dots[k * B + b];
  }
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(ProsparsePredictGate, PredictGateImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x_BxD
                                  .Arg<ffi::Buffer<ffi::F32>>()   // h_BxR = relu(x W1)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w2_RxF
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b2_F
                                  .Arg<ffi::Buffer<ffi::F32>>()   // threshold (one float32)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_gate_FxD
                                  .Ret<ffi::Buffer<ffi::F32>>()   // gate_BxF
                                  .Ret<ffi::Buffer<ffi::PRED>>()); // predicted_F
