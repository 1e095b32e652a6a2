// 2-D convolution (forward, backward-data, backward-weights) through oneDNN, as XLA FFI
// handlers for JAX's CPU backend. Activations are NHWC and kernels HWIO at the boundary, as
// cnnjax's layers use them; float32 only. Built by cnnjax/kernels/build.py.
//
// Every handler takes one int64 array attribute `params`:
//   {stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right, dil_h, dil_w, groups}
// (dilation as in lax: 1 = none). Primitives are created once per shape and parameters and
// kept in a process-wide cache: creating one JIT-compiles its kernel (milliseconds).

#include <omp.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

std::atomic<int> g_threads{0};

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

struct Params {
  int64_t sh, sw, pt, pb, pl, pr, dh, dw, groups;
};

// One operand of a primitive: the caller's layout and the primitive's. When they differ a
// reorder runs before (inputs) or after (outputs) the primitive.
struct Slot {
  int arg;
  bool output;
  memory::desc user, prim;
  std::unique_ptr<dnnl::reorder> reorder;
};

struct Entry {
  dnnl::primitive prim;
  std::vector<Slot> slots;
};

memory::dims Act(int64_t n, int64_t c, int64_t h, int64_t w) { return {n, c, h, w}; }

// HWIO (kh, kw, i, o) as oneDNN's (o, i, kh, kw) or grouped (g, o/g, i, kh, kw), by strides.
memory::desc UserWeights(int64_t kh, int64_t kw, int64_t i, int64_t o, int64_t g) {
  if (g == 1) return memory::desc({o, i, kh, kw}, dt::f32, {1, o, kw * i * o, i * o});
  return memory::desc({g, o / g, i, kh, kw}, dt::f32, {o / g, 1, o, kw * i * o, i * o});
}

memory::desc AnyWeights(int64_t kh, int64_t kw, int64_t i, int64_t o, int64_t g) {
  if (g == 1) return memory::desc({o, i, kh, kw}, dt::f32, tag::any);
  return memory::desc({g, o / g, i, kh, kw}, dt::f32, tag::any);
}

// CNNJAX_ONEDNN_ACT=any lets oneDNN pick blocked activation layouts (reordered per call);
// the default keeps NHWC, which oneDNN's AVX-512 kernels run directly.
bool AnyActivations() {
  static const bool any = [] {
    const char* v = std::getenv("CNNJAX_ONEDNN_ACT");
    return v != nullptr && std::strcmp(v, "any") == 0;
  }();
  return any;
}

memory::desc PrimAct(const memory::dims& d) {
  return memory::desc(d, dt::f32, AnyActivations() ? tag::any : tag::nhwc);
}

memory::desc UserAct(const memory::dims& d) { return memory::desc(d, dt::f32, tag::nhwc); }

void AddSlot(Entry& e, int arg, bool output, const memory::desc& user, const memory::desc& prim) {
  Slot s{arg, output, user, prim, nullptr};
  if (user != prim) {
    auto& eng = Engine();
    auto pd = output ? dnnl::reorder::primitive_desc(eng, prim, eng, user)
                     : dnnl::reorder::primitive_desc(eng, user, eng, prim);
    s.reorder = std::make_unique<dnnl::reorder>(pd);
  }
  e.slots.push_back(std::move(s));
}

enum Kind { kFwd = 0, kBwdData = 1, kBwdWeights = 2 };

struct Geometry {
  int64_t n, h, w, c, kh, kw, o, oh, ow;
};

memory::dims Strides(const Params& p) { return {p.sh, p.sw}; }
memory::dims Dilates(const Params& p) { return {p.dh - 1, p.dw - 1}; }
memory::dims PadL(const Params& p) { return {p.pt, p.pl}; }
memory::dims PadR(const Params& p) { return {p.pb, p.pr}; }

// x, w, y: the primitive-side descriptors (PrimAct, AnyWeights), shared by all three kinds.
dnnl::convolution_forward::primitive_desc FwdPd(const memory::desc& x, const memory::desc& w,
                                                const memory::desc& y, const Params& p) {
  dnnl::convolution_forward::desc d(dnnl::prop_kind::forward_training,
                                    dnnl::algorithm::convolution_direct, x, w, y, Strides(p),
                                    Dilates(p), PadL(p), PadR(p));
  return dnnl::convolution_forward::primitive_desc(d, Engine());
}

std::unique_ptr<Entry> Make(Kind kind, const Geometry& g, const Params& p) {
  auto e = std::make_unique<Entry>();
  auto ux = UserAct(Act(g.n, g.c, g.h, g.w));
  auto uy = UserAct(Act(g.n, g.o, g.oh, g.ow));
  auto uw = UserWeights(g.kh, g.kw, g.c / p.groups, g.o, p.groups);
  auto x = PrimAct(Act(g.n, g.c, g.h, g.w));
  auto y = PrimAct(Act(g.n, g.o, g.oh, g.ow));
  auto w = AnyWeights(g.kh, g.kw, g.c / p.groups, g.o, p.groups);
  auto fwd = FwdPd(x, w, y, p);
  if (kind == kFwd) {
    e->prim = dnnl::convolution_forward(fwd);
    AddSlot(*e, DNNL_ARG_SRC, false, ux, fwd.src_desc());
    AddSlot(*e, DNNL_ARG_WEIGHTS, false, uw, fwd.weights_desc());
    AddSlot(*e, DNNL_ARG_DST, true, uy, fwd.dst_desc());
  } else if (kind == kBwdData) {
    dnnl::convolution_backward_data::desc d(dnnl::algorithm::convolution_direct, x, w, y,
                                            Strides(p), Dilates(p), PadL(p), PadR(p));
    dnnl::convolution_backward_data::primitive_desc pd(d, Engine(), fwd);
    e->prim = dnnl::convolution_backward_data(pd);
    AddSlot(*e, DNNL_ARG_DIFF_DST, false, uy, pd.diff_dst_desc());
    AddSlot(*e, DNNL_ARG_WEIGHTS, false, uw, pd.weights_desc());
    AddSlot(*e, DNNL_ARG_DIFF_SRC, true, ux, pd.diff_src_desc());
  } else {
    dnnl::convolution_backward_weights::desc d(dnnl::algorithm::convolution_direct, x, w, y,
                                               Strides(p), Dilates(p), PadL(p), PadR(p));
    dnnl::convolution_backward_weights::primitive_desc pd(d, Engine(), fwd);
    e->prim = dnnl::convolution_backward_weights(pd);
    AddSlot(*e, DNNL_ARG_SRC, false, ux, pd.src_desc());
    AddSlot(*e, DNNL_ARG_DIFF_DST, false, uy, pd.diff_dst_desc());
    AddSlot(*e, DNNL_ARG_DIFF_WEIGHTS, true, uw, pd.diff_weights_desc());
  }
  return e;
}

Entry& Lookup(Kind kind, const Geometry& g, const Params& p) {
  static std::mutex mu;
  static std::unordered_map<std::string, std::unique_ptr<Entry>> cache;
  // oneDNN splits the work over the thread count it sees when a primitive is created.
  const int64_t threads = omp_get_max_threads();
  const int64_t key_parts[] = {kind, g.n,  g.h,  g.w,  g.c,  g.kh,     g.kw,   g.o,  g.oh, g.ow,
                               p.sh, p.sw, p.pt, p.pb, p.pl, p.pr,     p.dh,   p.dw, p.groups,
                               threads};
  std::string key(reinterpret_cast<const char*>(key_parts), sizeof(key_parts));
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = cache[key];
  if (!slot) slot = Make(kind, g, p);
  return *slot;
}

// Runs the entry on the caller's buffers (one per slot, in slot order).
void Run(Entry& e, const std::vector<void*>& ptrs) {
  thread_local dnnl::stream stream(Engine());
  auto& eng = Engine();
  std::unordered_map<int, memory> args;
  std::vector<std::pair<size_t, memory>> outputs;  // (slot, primitive-layout memory)
  for (size_t i = 0; i < e.slots.size(); ++i) {
    Slot& s = e.slots[i];
    memory user(s.user, eng, ptrs[i]);
    if (!s.reorder) {
      args.emplace(s.arg, user);
      continue;
    }
    memory prim(s.prim, eng);
    if (s.output) {
      outputs.emplace_back(i, prim);
    } else {
      s.reorder->execute(stream, user, prim);
    }
    args.emplace(s.arg, prim);
  }
  e.prim.execute(stream, args);
  for (auto& [i, prim] : outputs) {
    memory user(e.slots[i].user, eng, ptrs[i]);
    e.slots[i].reorder->execute(stream, prim, user);
  }
  stream.wait();
}

ffi::Error ParseParams(ffi::Span<const int64_t> a, Params* p) {
  if (a.size() != 9) return ffi::Error(ffi::ErrorCode::kInvalidArgument, "params: 9 ints");
  *p = {a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8]};
  return ffi::Error::Success();
}

ffi::Error Call(Kind kind, const Geometry& g, ffi::Span<const int64_t> attr,
                const std::vector<void*>& ptrs) {
  Params p;
  if (auto err = ParseParams(attr, &p); err.failure()) return err;
  if (int n = g_threads.load(); n > 0 && omp_get_max_threads() != n) omp_set_num_threads(n);
  try {
    Run(Lookup(kind, g, p), ptrs);
  } catch (const dnnl::error& err) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + err.what());
  }
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;
using F32Out = ffi::ResultBuffer<ffi::F32>;

// x: (N, H, W, C), w: (KH, KW, C/G, O) -> y: (N, OH, OW, O).
ffi::Error FwdImpl(F32 x, F32 w, F32Out y, ffi::Span<const int64_t> params) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  Geometry g{xd[0], xd[1], xd[2], xd[3], wd[0], wd[1], wd[3], yd[1], yd[2]};
  return Call(kFwd, g, params, {x.untyped_data(), w.untyped_data(), y->untyped_data()});
}

// dy: (N, OH, OW, O), w: (KH, KW, C/G, O) -> dx: (N, H, W, C).
ffi::Error BwdDataImpl(F32 dy, F32 w, F32Out dx, ffi::Span<const int64_t> params) {
  auto yd = dy.dimensions(), wd = w.dimensions(), xd = dx->dimensions();
  Geometry g{xd[0], xd[1], xd[2], xd[3], wd[0], wd[1], wd[3], yd[1], yd[2]};
  return Call(kBwdData, g, params, {dy.untyped_data(), w.untyped_data(), dx->untyped_data()});
}

// x: (N, H, W, C), dy: (N, OH, OW, O) -> dw: (KH, KW, C/G, O).
ffi::Error BwdWeightsImpl(F32 x, F32 dy, F32Out dw, ffi::Span<const int64_t> params) {
  auto xd = x.dimensions(), yd = dy.dimensions(), wd = dw->dimensions();
  Geometry g{xd[0], xd[1], xd[2], xd[3], wd[0], wd[1], wd[3], yd[1], yd[2]};
  return Call(kBwdWeights, g, params, {x.untyped_data(), dy.untyped_data(), dw->untyped_data()});
}

}  // namespace

#define CNNJAX_BIND                                 \
  ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>() \
      .Attr<ffi::Span<const int64_t>>("params")

XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnjaxOnednnConvFwd, FwdImpl, CNNJAX_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnjaxOnednnConvBwdData, BwdDataImpl, CNNJAX_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnjaxOnednnConvBwdWeights, BwdWeightsImpl, CNNJAX_BIND);

// How many OpenMP threads oneDNN uses (0: the OpenMP runtime's default). OpenMP keeps the
// count per calling thread and XLA runs a custom call on whichever of its threads is free, so
// the handler applies it on the thread it runs on.
extern "C" void CnnjaxOnednnSetThreads(int n) { g_threads.store(n); }
extern "C" int CnnjaxOnednnGetThreads() { return g_threads.load(); }
