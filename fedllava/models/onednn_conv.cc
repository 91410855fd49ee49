// fedllava: 2-D convolutions (NHWC activations, HWIO kernels, float32 or bfloat16, equal
// stride and symmetric padding on both axes) on oneDNN, as three XLA FFI custom calls for
// XLA:CPU: the forward, the input gradient and the kernel gradient. Built and registered by
// fedllava/models/onednn_conv.py (why: benchmarks/README.md, "oneDNN convolutions").
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include <omp.h>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using tag = memory::format_tag;
using dt = memory::data_type;

dnnl::engine& Engine() {
  static dnnl::engine* e = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *e;
}

// One convolution: N, H, W, C (input), O (output channels), KH, KW, stride, pad, data type
// (f32, or bf16 activations / kernels / gradients with f32 accumulation inside oneDNN), and
// the OpenMP threads it is made and run with.
using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                       int64_t, dt, int>;

struct Conv {
  memory::desc x_md, y_md, w_user_md;
  dnnl::convolution_forward::primitive_desc fwd_pd;
  dnnl::convolution_backward_data::primitive_desc bwd_data_pd;
  dnnl::convolution_backward_weights::primitive_desc bwd_weights_pd;
  dnnl::convolution_forward fwd;
  dnnl::convolution_backward_data bwd_data;
  dnnl::convolution_backward_weights bwd_weights;
  // Between the caller's HWIO kernel and the layout each primitive picked; empty (false)
  // where that layout is HWIO itself.
  dnnl::reorder to_fwd_w, to_bwd_data_w, from_bwd_weights_dw;
};

int64_t OutSize(int64_t n, int64_t k, int64_t s, int64_t p) { return (n + 2 * p - k) / s + 1; }

Conv* Make(const Key& k) {
  auto [n, h, w, c, o, kh, kw, s, p, type, threads] = k;
  const int64_t ho = OutSize(h, kh, s, p), wo = OutSize(w, kw, s, p);
  auto* conv = new Conv();
  conv->x_md = memory::desc({n, c, h, w}, type, tag::nhwc);
  conv->y_md = memory::desc({n, o, ho, wo}, type, tag::nhwc);
  conv->w_user_md = memory::desc({o, c, kh, kw}, type, tag::hwio);
  memory::desc w_any({o, c, kh, kw}, type, tag::any);
  memory::dims strides = {s, s}, pad = {p, p};
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto& e = Engine();
  conv->fwd_pd = dnnl::convolution_forward::primitive_desc(
      e, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, conv->x_md, w_any,
      conv->y_md, strides, pad, pad, attr);
  conv->bwd_data_pd = dnnl::convolution_backward_data::primitive_desc(
      e, dnnl::algorithm::convolution_direct, conv->x_md, w_any, conv->y_md, strides, pad, pad,
      conv->fwd_pd, attr);
  conv->bwd_weights_pd = dnnl::convolution_backward_weights::primitive_desc(
      e, dnnl::algorithm::convolution_direct, conv->x_md, w_any, conv->y_md, strides, pad, pad,
      conv->fwd_pd, attr);
  conv->fwd = dnnl::convolution_forward(conv->fwd_pd);
  conv->bwd_data = dnnl::convolution_backward_data(conv->bwd_data_pd);
  conv->bwd_weights = dnnl::convolution_backward_weights(conv->bwd_weights_pd);
  if (conv->fwd_pd.weights_desc() != conv->w_user_md)
    conv->to_fwd_w = dnnl::reorder(dnnl::reorder::primitive_desc(
        e, conv->w_user_md, e, conv->fwd_pd.weights_desc()));
  if (conv->bwd_data_pd.weights_desc() != conv->w_user_md)
    conv->to_bwd_data_w = dnnl::reorder(dnnl::reorder::primitive_desc(
        e, conv->w_user_md, e, conv->bwd_data_pd.weights_desc()));
  if (conv->bwd_weights_pd.diff_weights_desc() != conv->w_user_md)
    conv->from_bwd_weights_dw = dnnl::reorder(dnnl::reorder::primitive_desc(
        e, conv->bwd_weights_pd.diff_weights_desc(), e, conv->w_user_md));
  return conv;
}

// XLA:CPU calls a custom call from its own worker threads, and each calling thread gets an
// OpenMP team of its own: for a small convolution the team's fork, join and spinning cost more
// than the work (digits' 8x8 images: 5x slower than one thread on 2 cores). Below
// FEDLLAVA_ONEDNN_SMALL_MACS multiply-adds (default 2^22) a convolution runs on the calling
// thread alone; above, on the process's OpenMP threads (OMP_NUM_THREADS, CPU affinity).
int Threads(const Key& k) {
  static const int max_threads = omp_get_max_threads();
  static const int64_t small = [] {
    const char* env = std::getenv("FEDLLAVA_ONEDNN_SMALL_MACS");
    return env ? std::atoll(env) : int64_t{1} << 22;
  }();
  auto [n, h, w, c, o, kh, kw, s, p, type, threads] = k;
  const int64_t macs = n * OutSize(h, kh, s, p) * OutSize(w, kw, s, p) * o * c * kh * kw;
  return macs < small ? 1 : max_threads;
}

// Primitives are built once per shape (oneDNN JIT-compiles them) and shared by all threads;
// executing a primitive from several threads at once is safe with user scratchpads.
Conv* Get(Key k) {
  std::get<10>(k) = Threads(k);
  // The calling thread's team size (a per-thread setting), the same at creation and execution.
  omp_set_num_threads(std::get<10>(k));
  static std::mutex* mu = new std::mutex();
  static std::map<Key, Conv*>* cache = new std::map<Key, Conv*>();
  std::lock_guard<std::mutex> lock(*mu);
  auto it = cache->find(k);
  if (it != cache->end()) return it->second;
  Conv* conv = Make(k);
  (*cache)[k] = conv;
  return conv;
}

// Per-thread scratch: 64-byte aligned, grown on demand.
struct Scratch {
  void* ptr = nullptr;
  size_t size = 0;
  void* Get(size_t n) {
    if (n > size) {
      std::free(ptr);
      size = (n + 63) / 64 * 64;
      ptr = std::aligned_alloc(64, size);
    }
    return ptr;
  }
  ~Scratch() { std::free(ptr); }
};
thread_local Scratch scratchpad, weights_scratch;

dnnl::stream& Stream() {
  thread_local dnnl::stream s(Engine());
  return s;
}

template <ffi::DataType T>
constexpr dt Type() {
  return T == ffi::DataType::BF16 ? dt::bf16 : dt::f32;
}

template <ffi::DataType T, typename B>
Key MakeKey(const B& x_dims, const B& w_dims, int64_t stride, int64_t pad) {
  return Key(x_dims[0], x_dims[1], x_dims[2], x_dims[3], w_dims[3], w_dims[0], w_dims[1], stride,
             pad, Type<T>(), 0);
}

// The kernel as a primitive wants it: the caller's HWIO buffer itself, or `to` (a reorder
// into this thread's scratch) applied to it.
memory KernelFor(Conv* c, const memory::desc& md, dnnl::reorder& to, void* w, dnnl::stream& s) {
  memory user(c->w_user_md, Engine(), w);
  if (!to) return user;
  memory mem(md, Engine(), weights_scratch.Get(md.get_size()));
  to.execute(s, user, mem);
  return mem;
}

memory Scratchpad(const memory::desc& md) {
  return memory(md, Engine(), scratchpad.Get(md.get_size()));
}

ffi::Error Failed(const char* what, const dnnl::error& err) {
  return ffi::Error::Internal(std::string("oneDNN convolution ") + what + ": " + err.what());
}

template <ffi::DataType T>
ffi::Error Fwd(ffi::Buffer<T> x, ffi::Buffer<T> w, ffi::ResultBuffer<T> y, int64_t stride,
               int64_t pad) {
  try {
    Conv* c = Get(MakeKey<T>(x.dimensions(), w.dimensions(), stride, pad));
    auto& s = Stream();
    memory kernel = KernelFor(c, c->fwd_pd.weights_desc(), c->to_fwd_w, w.untyped_data(), s);
    c->fwd.execute(s, {{DNNL_ARG_SRC, memory(c->x_md, Engine(), x.untyped_data())},
                       {DNNL_ARG_WEIGHTS, kernel},
                       {DNNL_ARG_DST, memory(c->y_md, Engine(), y->untyped_data())},
                       {DNNL_ARG_SCRATCHPAD, Scratchpad(c->fwd_pd.scratchpad_desc())}});
    s.wait();
  } catch (const dnnl::error& err) {
    return Failed("forward", err);
  }
  return ffi::Error::Success();
}

template <ffi::DataType T>
ffi::Error BwdData(ffi::Buffer<T> dy, ffi::Buffer<T> w, ffi::ResultBuffer<T> dx, int64_t stride,
                   int64_t pad) {
  try {
    Conv* c = Get(MakeKey<T>(dx->dimensions(), w.dimensions(), stride, pad));
    auto& s = Stream();
    memory kernel =
        KernelFor(c, c->bwd_data_pd.weights_desc(), c->to_bwd_data_w, w.untyped_data(), s);
    c->bwd_data.execute(s, {{DNNL_ARG_DIFF_DST, memory(c->y_md, Engine(), dy.untyped_data())},
                            {DNNL_ARG_WEIGHTS, kernel},
                            {DNNL_ARG_DIFF_SRC, memory(c->x_md, Engine(), dx->untyped_data())},
                            {DNNL_ARG_SCRATCHPAD, Scratchpad(c->bwd_data_pd.scratchpad_desc())}});
    s.wait();
  } catch (const dnnl::error& err) {
    return Failed("input gradient", err);
  }
  return ffi::Error::Success();
}

template <ffi::DataType T>
ffi::Error BwdWeights(ffi::Buffer<T> x, ffi::Buffer<T> dy, ffi::ResultBuffer<T> dw,
                      int64_t stride, int64_t pad) {
  try {
    Conv* c = Get(MakeKey<T>(x.dimensions(), dw->dimensions(), stride, pad));
    auto& s = Stream();
    memory user(c->w_user_md, Engine(), dw->untyped_data());
    memory grad = user;
    if (c->from_bwd_weights_dw) {  // oneDNN's layout in scratch, then HWIO into the result
      auto md = c->bwd_weights_pd.diff_weights_desc();
      grad = memory(md, Engine(), weights_scratch.Get(md.get_size()));
    }
    c->bwd_weights.execute(
        s, {{DNNL_ARG_SRC, memory(c->x_md, Engine(), x.untyped_data())},
            {DNNL_ARG_DIFF_DST, memory(c->y_md, Engine(), dy.untyped_data())},
            {DNNL_ARG_DIFF_WEIGHTS, grad},
            {DNNL_ARG_SCRATCHPAD, Scratchpad(c->bwd_weights_pd.scratchpad_desc())}});
    if (c->from_bwd_weights_dw) c->from_bwd_weights_dw.execute(s, grad, user);
    s.wait();
  } catch (const dnnl::error& err) {
    return Failed("kernel gradient", err);
  }
  return ffi::Error::Success();
}

}  // namespace

#define FEDLLAVA_CONV_HANDLER(name, fn, type)                                   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, fn<type>,                                  \
                                ffi::Ffi::Bind()                                 \
                                    .Arg<ffi::Buffer<type>>()                    \
                                    .Arg<ffi::Buffer<type>>()                    \
                                    .Ret<ffi::Buffer<type>>()                    \
                                    .Attr<int64_t>("stride")                     \
                                    .Attr<int64_t>("pad"));

FEDLLAVA_CONV_HANDLER(FedllavaOnednnConvFwd, Fwd, ffi::F32)
FEDLLAVA_CONV_HANDLER(FedllavaOnednnConvBwdData, BwdData, ffi::F32)
FEDLLAVA_CONV_HANDLER(FedllavaOnednnConvBwdWeights, BwdWeights, ffi::F32)
FEDLLAVA_CONV_HANDLER(FedllavaOnednnConvFwdBf16, Fwd, ffi::BF16)
FEDLLAVA_CONV_HANDLER(FedllavaOnednnConvBwdDataBf16, BwdData, ffi::BF16)
FEDLLAVA_CONV_HANDLER(FedllavaOnednnConvBwdWeightsBf16, BwdWeights, ffi::BF16)
