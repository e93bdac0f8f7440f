// XLA FFI handlers for experiments/onednn_conv.py: a 2-D convolution with stride 1 and the same
// zero padding on every side, NHWC input / HWIO kernel / NHWC output, float32, on oneDNN.
// XLA:CPU's own convolutions take 1.4-1.9x oneDNN's time on LeNet++'s layers (BENCHMARKS.md).
#include <omp.h>

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

struct Shape {
  int64_t n, h, w, ci, co, kh, kw, pad, threads;
  using tag = memory::format_tag;

  auto key() const { return std::make_tuple(n, h, w, ci, co, kh, kw, pad, threads); }
  bool operator<(const Shape& o) const { return key() < o.key(); }
  // oneDNN names dimensions logically (N, C, H, W / O, I, H, W); the tag gives the layout.
  memory::desc src(tag t = tag::nhwc) const { return {{n, ci, h, w}, memory::data_type::f32, t}; }
  memory::desc weights(tag t = tag::hwio) const {
    return {{co, ci, kh, kw}, memory::data_type::f32, t};
  }
  memory::desc dst(tag t = tag::nhwc) const {
    return {{n, co, h + 2 * pad - kh + 1, w + 2 * pad - kw + 1}, memory::data_type::f32, t};
  }
};

struct Primitive {
  dnnl::primitive primitive;
  dnnl::primitive_desc_base desc;
};

struct Primitives {
  Primitive forward, backward_data, backward_weights;
};

// Layouts are left to oneDNN ("any"): its direct kernels want blocked layouts (e.g. nChw8c on
// AVX2); with NHWC forced it falls back to a GEMM-based convolution that is slower than XLA's.
// A primitive splits its work for the OpenMP thread count in force when it is created and
// expects that many threads when it runs (its weight-gradient kernels meet at a barrier: fewer
// threads hang it), so the count is part of the key and is set before creating.
// Scratchpads are ours (user mode, one per call in Run): oneDNN's own is shared by every
// primitive of the process, so two calls at once (two devices, or two independent
// convolutions of one program) would share the weight-gradient kernels' barrier in it and hang.
dnnl::primitive_attr Attributes() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

Primitives& Cached(const Shape& s) {
  omp_set_num_threads(static_cast<int>(s.threads));
  static std::mutex mutex;
  static std::map<Shape, Primitives> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(s);
  if (it != cache.end()) return it->second;
  const auto any = Shape::tag::any;
  const memory::dims strides{1, 1}, pad{s.pad, s.pad};
  dnnl::convolution_forward::primitive_desc forward(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      s.src(any), s.weights(any), s.dst(any), strides, pad, pad, Attributes());
  dnnl::convolution_backward_data::primitive_desc backward_data(
      Engine(), dnnl::algorithm::convolution_direct, s.src(any), s.weights(any), s.dst(any),
      strides, pad, pad, forward, Attributes());
  dnnl::convolution_backward_weights::primitive_desc backward_weights(
      Engine(), dnnl::algorithm::convolution_direct, s.src(any), s.weights(any), s.dst(any),
      strides, pad, pad, forward, Attributes());
  Primitives p{{dnnl::convolution_forward(forward), forward},
               {dnnl::convolution_backward_data(backward_data), backward_data},
               {dnnl::convolution_backward_weights(backward_weights), backward_weights}};
  return cache.emplace(s, p).first->second;
}

struct Arg {
  int id;
  memory::desc user;  // the XLA buffer's layout (NHWC / HWIO)
  void* data;
  bool output;
};

// Runs a primitive made with Attributes() on its own scratchpad (none when it needs none).
void Execute(const dnnl::primitive& primitive, const dnnl::primitive_desc_base& desc,
             std::unordered_map<int, memory> args, dnnl::stream& stream) {
  memory::desc scratch = desc.scratchpad_desc();
  if (scratch.get_size() > 0) args[DNNL_ARG_SCRATCHPAD] = memory(scratch, Engine());
  primitive.execute(stream, args);
}

void Reorder(const memory& from, const memory& to, dnnl::stream& stream) {
  dnnl::reorder::primitive_desc desc(from, to, Attributes());
  Execute(dnnl::reorder(desc), desc, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}}, stream);
}

// Runs p on XLA's buffers, reordering each into (or out of) the layout p chose where they differ.
void Run(const Primitive& p, std::initializer_list<Arg> args, int64_t threads) {
  // Calls on one thread each (one device per core, the driver's default) run at once; calls on
  // several OpenMP threads take turns, as two teams on the same cores would spin against each
  // other (each already keeps its cores busy).
  static std::mutex team;
  std::unique_lock<std::mutex> lock(team, std::defer_lock);
  if (threads > 1) lock.lock();
  omp_set_num_threads(static_cast<int>(threads));  // as when p was created (Cached)
  dnnl::stream stream(Engine());
  std::unordered_map<int, memory> bound;
  std::vector<std::pair<memory, memory>> outputs;  // (primitive's layout, XLA's buffer)
  for (const Arg& a : args) {
    memory user(a.user, Engine(), a.data);
    memory::desc wanted = p.desc.query_md(dnnl::query::exec_arg_md, a.id);
    if (wanted == a.user) {
      bound[a.id] = user;
      continue;
    }
    memory mine(wanted, Engine());
    if (a.output) {
      outputs.emplace_back(mine, user);
    } else {
      Reorder(user, mine, stream);
    }
    bound[a.id] = mine;
  }
  Execute(p.primitive, p.desc, bound, stream);
  for (auto& [mine, user] : outputs) Reorder(mine, user, stream);
  stream.wait();
}

Shape ShapeOf(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w, int64_t pad,
              int64_t threads) {
  return {x[0], x[1], x[2], x[3], w[3], w[0], w[1], pad, threads};
}

ffi::Error Guarded(const std::function<void()>& body) {
  try {
    body();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

// y = conv(x, w)
ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, int64_t pad, int64_t threads) {
  return Guarded([&] {
    Shape s = ShapeOf(x.dimensions(), w.dimensions(), pad, threads);
    Run(Cached(s).forward,
        {{DNNL_ARG_SRC, s.src(), x.typed_data(), false},
         {DNNL_ARG_WEIGHTS, s.weights(), w.typed_data(), false},
         {DNNL_ARG_DST, s.dst(), y->typed_data(), true}},
        threads);
  });
}

// dx = ∂L/∂x from dy = ∂L/∂y and w
ffi::Error BackwardData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> dx, int64_t pad, int64_t threads) {
  return Guarded([&] {
    Shape s = ShapeOf(dx->dimensions(), w.dimensions(), pad, threads);
    Run(Cached(s).backward_data,
        {{DNNL_ARG_DIFF_DST, s.dst(), dy.typed_data(), false},
         {DNNL_ARG_WEIGHTS, s.weights(), w.typed_data(), false},
         {DNNL_ARG_DIFF_SRC, s.src(), dx->typed_data(), true}},
        threads);
  });
}

// dw = ∂L/∂w from x and dy
ffi::Error BackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                           ffi::ResultBuffer<ffi::F32> dw, int64_t pad, int64_t threads) {
  return Guarded([&] {
    Shape s = ShapeOf(x.dimensions(), dw->dimensions(), pad, threads);
    Run(Cached(s).backward_weights,
        {{DNNL_ARG_SRC, s.src(), x.typed_data(), false},
         {DNNL_ARG_DIFF_DST, s.dst(), dy.typed_data(), false},
         {DNNL_ARG_DIFF_WEIGHTS, s.weights(), dw->typed_data(), true}},
        threads);
  });
}

}  // namespace

#define MLX_BIND_CONV(symbol, impl)                              \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, impl,                    \
                                ffi::Ffi::Bind()                 \
                                    .Arg<ffi::Buffer<ffi::F32>>() \
                                    .Arg<ffi::Buffer<ffi::F32>>() \
                                    .Ret<ffi::Buffer<ffi::F32>>() \
                                    .Attr<int64_t>("padding")    \
                                    .Attr<int64_t>("threads"))

MLX_BIND_CONV(MlxConvForward, Forward);
MLX_BIND_CONV(MlxConvBackwardData, BackwardData);
MLX_BIND_CONV(MlxConvBackwardWeights, BackwardWeights);
