// oneDNN convolutions as XLA FFI handlers for the CPU backend: NHWC input, HWIO kernel,
// NHWC output, symmetric zero padding, float32. Forward, input gradient and kernel
// gradient, and an inference forward with bias, residual add and ReLU fused in;
// ddnn_jax/onednn.py builds this file, registers the handlers and wraps them in a
// custom_vjp. XLA CPU's own (YNNPACK) convolutions run at a third of oneDNN's
// rate on the small channel counts of CIFAR ResNets (bench/conv_kernels.py).
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include <omp.h>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = dnnl::memory::format_tag;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

struct Shape {  // One convolution: x (n, h, w, c) * kernel (kh, kw, c, o) -> y (n, oh, ow, o).
  int64_t n, h, w, c, kh, kw, o, oh, ow, stride, pad, threads;
  std::string Key() const {
    std::string key;
    for (int64_t v : {n, h, w, c, kh, kw, o, oh, ow, stride, pad, threads}) key += std::to_string(v) + ",";
    return key;
  }
  memory::desc Src() const { return {{n, c, h, w}, memory::data_type::f32, Tag::nhwc}; }
  memory::desc Dst() const { return {{n, o, oh, ow}, memory::data_type::f32, Tag::nhwc}; }
  memory::desc UserKernel() const { return {{o, c, kh, kw}, memory::data_type::f32, Tag::hwio}; }
  // oneDNN picks the kernel layout its fastest implementation wants (plain HWIO would
  // send both gradients to a slow GEMM path); the user's HWIO kernel is reordered.
  memory::desc AnyKernel() const { return {{o, c, kh, kw}, memory::data_type::f32, Tag::any}; }
  dnnl::convolution_forward::primitive_desc Forward() const {
    return {Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
            Src(), AnyKernel(), Dst(), {stride, stride}, {pad, pad}, {pad, pad}, Attr()};
  }
  // XLA runs each device's calls on its own thread, so one primitive may execute on
  // several threads at once: each call brings its own scratchpad (the library's shared
  // one would be written by all of them).
  static dnnl::primitive_attr Attr() {
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    return attr;
  }
};

template <class P>
struct Primitive {
  typename P::primitive_desc desc;
  P primitive;
  explicit Primitive(const typename P::primitive_desc& d) : desc(d), primitive(d) {}
};

// Creating a primitive JIT-compiles its kernel (milliseconds): one per shape, kept.
// ``variant`` tells apart primitives of one class and shape (the inference post-ops).
template <class P, class MakeDesc>
std::shared_ptr<Primitive<P>> Cached(const Shape& shape, MakeDesc make_desc,
                                     const std::string& variant = "") {
  static std::mutex mutex;
  static std::unordered_map<std::string, std::shared_ptr<Primitive<P>>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto& entry = cache[variant + shape.Key()];
  if (!entry) entry = std::make_shared<Primitive<P>>(make_desc());
  return entry;
}

memory KernelIn(const Shape& shape, const memory::desc& wanted, float* data, dnnl::stream& s) {
  memory user(shape.UserKernel(), Engine(), data);
  if (wanted == shape.UserKernel()) return user;
  memory blocked(wanted, Engine());
  dnnl::reorder(user, blocked).execute(s, user, blocked);
  return blocked;
}

// ``threads``: OpenMP threads for this call (a primitive is built for the count it
// runs with). Several CPU devices call at once, each wants its share of the cores.
Shape MakeShape(ffi::Span<const int64_t> x, ffi::Span<const int64_t> k,
                ffi::Span<const int64_t> y, int64_t stride, int64_t pad, int64_t threads) {
  omp_set_num_threads(static_cast<int>(threads));
  return {x[0], x[1], x[2], x[3], k[0], k[1], k[3], y[1], y[2], stride, pad, threads};
}

ffi::Error Run(const std::function<void()>& body) {
  try {
    body();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                       ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t pad,
                       int64_t threads) {
  return Run([&] {
    Shape shape = MakeShape(x.dimensions(), kernel.dimensions(), y->dimensions(), stride, pad, threads);
    auto p = Cached<dnnl::convolution_forward>(shape, [&] { return shape.Forward(); });
    dnnl::stream s(Engine());
    memory scratch(p->desc.scratchpad_desc(), Engine());
    memory src(p->desc.src_desc(), Engine(), x.typed_data());
    memory dst(p->desc.dst_desc(), Engine(), y->typed_data());
    memory k = KernelIn(shape, p->desc.weights_desc(), kernel.typed_data(), s);
    p->primitive.execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, k}, {DNNL_ARG_DST, dst}, {DNNL_ARG_SCRATCHPAD, scratch}});
    s.wait();
  });
}

ffi::Error InputGradImpl(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> kernel,
                         ffi::ResultBuffer<ffi::F32> dx, int64_t stride, int64_t pad,
                       int64_t threads) {
  return Run([&] {
    Shape shape = MakeShape(dx->dimensions(), kernel.dimensions(), dy.dimensions(), stride, pad, threads);
    auto p = Cached<dnnl::convolution_backward_data>(shape, [&] {
      return dnnl::convolution_backward_data::primitive_desc(
          Engine(), dnnl::algorithm::convolution_direct, shape.Src(), shape.AnyKernel(),
          shape.Dst(), {stride, stride}, {pad, pad}, {pad, pad}, shape.Forward(), Shape::Attr());
    });
    dnnl::stream s(Engine());
    memory scratch(p->desc.scratchpad_desc(), Engine());
    memory diff_dst(p->desc.diff_dst_desc(), Engine(), dy.typed_data());
    memory diff_src(p->desc.diff_src_desc(), Engine(), dx->typed_data());
    memory k = KernelIn(shape, p->desc.weights_desc(), kernel.typed_data(), s);
    p->primitive.execute(
        s, {{DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_WEIGHTS, k}, {DNNL_ARG_DIFF_SRC, diff_src}, {DNNL_ARG_SCRATCHPAD, scratch}});
    s.wait();
  });
}

ffi::Error KernelGradImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dkernel, int64_t stride, int64_t pad,
                       int64_t threads) {
  return Run([&] {
    Shape shape = MakeShape(x.dimensions(), dkernel->dimensions(), dy.dimensions(), stride, pad, threads);
    auto p = Cached<dnnl::convolution_backward_weights>(shape, [&] {
      return dnnl::convolution_backward_weights::primitive_desc(
          Engine(), dnnl::algorithm::convolution_direct, shape.Src(), shape.AnyKernel(),
          shape.Dst(), {stride, stride}, {pad, pad}, {pad, pad}, shape.Forward(), Shape::Attr());
    });
    dnnl::stream s(Engine());
    memory scratch(p->desc.scratchpad_desc(), Engine());
    memory src(p->desc.src_desc(), Engine(), x.typed_data());
    memory diff_dst(p->desc.diff_dst_desc(), Engine(), dy.typed_data());
    memory user(shape.UserKernel(), Engine(), dkernel->typed_data());
    bool plain = p->desc.diff_weights_desc() == shape.UserKernel();
    memory diff_k = plain ? user : memory(p->desc.diff_weights_desc(), Engine());
    p->primitive.execute(
        s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_DIFF_WEIGHTS, diff_k}, {DNNL_ARG_SCRATCHPAD, scratch}});
    if (!plain) dnnl::reorder(diff_k, user).execute(s, diff_k, user);
    s.wait();
  });
}

// Inference: y = [relu](conv(x, kernel) + bias [+ residual]), the bias, residual add and
// ReLU applied by oneDNN as the output is written (post-ops), so no pass over y follows.
// A batch-normalised layer in inference is this with BN folded into kernel and bias.
// ``residual`` has y's shape, or no elements for none.
ffi::Error InferenceImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                         ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> residual,
                         ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t pad,
                         int64_t threads, int64_t relu) {
  return Run([&] {
    Shape shape = MakeShape(x.dimensions(), kernel.dimensions(), y->dimensions(), stride, pad, threads);
    const bool add = residual.element_count() > 0;
    auto p = Cached<dnnl::convolution_forward>(shape, [&] {
      dnnl::post_ops ops;
      if (add) ops.append_binary(dnnl::algorithm::binary_add, shape.Dst());
      if (relu) ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
      dnnl::primitive_attr attr = Shape::Attr();
      attr.set_post_ops(ops);
      memory::desc bias_desc({shape.o}, memory::data_type::f32, Tag::a);
      return dnnl::convolution_forward::primitive_desc(
          Engine(), dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct,
          shape.Src(), shape.AnyKernel(), bias_desc, shape.Dst(), {stride, stride},
          {pad, pad}, {pad, pad}, attr);
    }, std::string("inference:") + (add ? "add," : "") + (relu ? "relu," : ""));
    dnnl::stream s(Engine());
    memory scratch(p->desc.scratchpad_desc(), Engine());
    memory src(p->desc.src_desc(), Engine(), x.typed_data());
    memory dst(p->desc.dst_desc(), Engine(), y->typed_data());
    memory b(p->desc.bias_desc(), Engine(), bias.typed_data());
    memory k = KernelIn(shape, p->desc.weights_desc(), kernel.typed_data(), s);
    std::unordered_map<int, memory> args = {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, k},
                                            {DNNL_ARG_BIAS, b}, {DNNL_ARG_DST, dst},
                                            {DNNL_ARG_SCRATCHPAD, scratch}};
    if (add) {
      args[DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1] =
          memory(shape.Dst(), Engine(), residual.typed_data());
    }
    p->primitive.execute(s, args);
    s.wait();
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DdnnConvInference, InferenceImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad")
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("relu"));

#define DDNN_CONV_HANDLER(name, impl)                                         \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, impl,                                   \
                                ffi::Ffi::Bind()                              \
                                    .Arg<ffi::Buffer<ffi::F32>>()             \
                                    .Arg<ffi::Buffer<ffi::F32>>()             \
                                    .Ret<ffi::Buffer<ffi::F32>>()             \
                                    .Attr<int64_t>("stride")                  \
                                    .Attr<int64_t>("pad")                     \
                                    .Attr<int64_t>("threads"));

DDNN_CONV_HANDLER(DdnnConvForward, ForwardImpl)
DDNN_CONV_HANDLER(DdnnConvInputGrad, InputGradImpl)
DDNN_CONV_HANDLER(DdnnConvKernelGrad, KernelGradImpl)
