// See cudnn_sdpa.h. One cuDNN frontend graph per call layout (every size and stride of every
// tensor, dtype, device), built on first use and kept per thread (cuDNN's execution plans are
// not guaranteed thread-safe); the scale is passed by value at execution, so it is not part of
// the key. PyTorch's own cuDNN attention keys its graphs on q/k/v only and allocates its
// outputs, which is why this path builds its own.
#include "cudnn_sdpa.h"

#ifdef OASIS_WITH_CUDNN_FRONTEND

#include <ATen/Context.h>
#include <ATen/cudnn/Handle.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cudnn_frontend.h>

#include <dlfcn.h>

#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace fe = cudnn_frontend;

// The frontend, built with NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING, finds cuDNN's functions through
// this handle, which its user defines and sets (its Python package does so on import). Ours is
// the cuDNN that PyTorch already loaded, so both share one library and one version.
namespace cudnn_frontend {
void* cudnn_dlhandle = nullptr;
}

namespace oasis {
namespace {

enum Uid : int64_t { Q = 1, K, V, O, STATS, DO, DQ, DK, DV, SCALE };

using Key = std::vector<int64_t>;

struct KeyHash {
  size_t operator()(const Key& key) const {
    size_t h = 1469598103934665603ull;
    for (int64_t x : key) h = (h ^ static_cast<uint64_t>(x)) * 1099511628211ull;
    return h;
  }
};

// a built graph, or null and why cuDNN declined the layout
struct Cached {
  std::shared_ptr<fe::graph::Graph> graph;
  std::string why;
};
thread_local std::unordered_map<Key, Cached, KeyHash> graphs;

Key key_of(int64_t kind, std::initializer_list<const at::Tensor*> tensors) {
  const at::Tensor& first = **tensors.begin();
  Key key{kind, first.device().index(), static_cast<int64_t>(first.scalar_type())};
  for (const at::Tensor* t : tensors) {
    key.insert(key.end(), t->sizes().begin(), t->sizes().end());
    key.insert(key.end(), t->strides().begin(), t->strides().end());
  }
  return key;
}

// "" where the tensors suit cuDNN's graphs, else why not
std::string unsupported(std::initializer_list<const at::Tensor*> tensors, const at::Tensor& lse) {
  const at::Tensor& first = **tensors.begin();
  if (!first.is_cuda()) return "not a CUDA tensor";
  if (first.scalar_type() != at::kHalf && first.scalar_type() != at::kBFloat16) {
    return std::string("dtype ") + c10::toString(first.scalar_type()) + " (cuDNN attention takes fp16/bf16)";
  }
  for (const at::Tensor* t : tensors) {
    if (t->dim() != 4 || t->scalar_type() != first.scalar_type() || t->device() != first.device()) {
      return "tensors differ in rank, dtype or device";
    }
    if (t->stride(3) != 1) return "a head dim with a non-unit stride";
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0) return "a pointer not 16-byte aligned";
  }
  if (lse.dim() != 4 || lse.scalar_type() != at::kFloat || lse.device() != first.device() || lse.size(3) != 1) {
    return "lse is not a float32 [B, h, N, 1] view on the same device";
  }
  return "";
}

// "" where the sizes agree: q and o [B, h, Nq, D], k and v [B, h, Nk, D], lse [B, h, Nq, 1]
// (cuDNN does not check the Stats' sizes; a smaller lse would be written out of bounds)
std::string mismatched(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& o,
                       const at::Tensor& lse) {
  const bool agree = k.sizes() == v.sizes() && o.sizes() == q.sizes() && k.size(0) == q.size(0) &&
                     k.size(1) == q.size(1) && k.size(3) == q.size(3) && lse.size(0) == q.size(0) &&
                     lse.size(1) == q.size(1) && lse.size(2) == q.size(2);
  return agree ? "" : "sizes of q, k, v, out and lse do not agree";
}

fe::graph::Tensor_attributes described(Uid uid, const char* name, const at::Tensor& t) {
  return fe::graph::Tensor_attributes().set_uid(uid).set_name(name).set_dim(t.sizes().vec()).set_stride(
      t.strides().vec());
}

std::shared_ptr<fe::graph::Graph> new_graph(const at::Tensor& q) {
  auto graph = std::make_shared<fe::graph::Graph>();
  graph->set_io_data_type(q.scalar_type() == at::kBFloat16 ? fe::DataType_t::BFLOAT16 : fe::DataType_t::HALF)
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  return graph;
}

std::shared_ptr<fe::graph::Tensor_attributes> scale_input(fe::graph::Graph& graph) {
  return graph.tensor(fe::graph::Tensor_attributes()
                          .set_uid(SCALE)
                          .set_name("scale")
                          .set_dim({1, 1, 1, 1})
                          .set_stride({1, 1, 1, 1})
                          .set_is_pass_by_value(true)
                          .set_data_type(fe::DataType_t::FLOAT));
}

// validate, lower and plan: {"", ""} where it built, else the step that failed and cuDNN's message
std::pair<std::string, std::string> build_failure(fe::graph::Graph& graph, cudnnHandle_t handle) {
  const std::pair<const char*, std::function<fe::error_t()>> steps[] = {
      {"validate", [&] { return graph.validate(); }},
      {"build_operation_graph", [&] { return graph.build_operation_graph(handle); }},
      {"create_execution_plans", [&] { return graph.create_execution_plans({fe::HeurMode_t::A}); }},
      {"check_support", [&] { return graph.check_support(handle); }},
      {"build_plans", [&] { return graph.build_plans(handle); }},
  };
  for (const auto& [name, step] : steps) {
    fe::error_t status = step();
    if (!status.is_good()) return {name, status.get_message()};
  }
  return {"", ""};
}

// The graph cached for `key`, described by `describe` and built on first use; null with the
// reason where cuDNN declines. The frontend throws for some layouts (e.g. "No suitable
// implementation" from graph.sdpa): a decline too. Failures of build_plans (resources, not the
// layout) are not cached, so a later call tries again.
Cached graph_for(const Key& key, cudnnHandle_t handle,
                 const std::function<std::shared_ptr<fe::graph::Graph>()>& describe) {
  if (auto found = graphs.find(key); found != graphs.end()) return found->second;
  Cached made;
  bool lasting = true;
  try {
    auto graph = describe();
    auto [step, message] = build_failure(*graph, handle);
    if (step.empty()) {
      made.graph = std::move(graph);
    } else {
      made.why = "cuDNN " + step + ": " + message;
      lasting = step != "build_plans";
    }
  } catch (const std::exception& e) {
    made.why = std::string("cuDNN frontend: ") + e.what();
  }
  if (lasting) graphs.emplace(key, made);
  return made;
}

// why this thread's last call declined ("" after a call that ran)
thread_local std::string last_decline;

bool declined(std::string why) {
  last_decline = std::move(why);
  return false;
}

// PyTorch's cuDNN, loaded by now (getCudnnHandle made a handle with it); false if it is not
// libcudnn.so.9
bool cudnn_library_found() {
  static const bool found = [] {
    if (fe::cudnn_dlhandle == nullptr) fe::cudnn_dlhandle = dlopen("libcudnn.so.9", RTLD_NOW | RTLD_NOLOAD);
    return fe::cudnn_dlhandle != nullptr;
  }();
  return found;
}

// PyTorch's cuDNN handle for this thread and device, set to the current stream; null where
// libcudnn.so.9 is not loaded (the frontend resolves its calls, cudnnSetStream first, through
// the handle that cudnn_library_found sets, so that check comes before any of them)
cudnnHandle_t handle_on(const at::Tensor& t) {
  cudnnHandle_t handle = at::native::getCudnnHandle();
  if (!cudnn_library_found()) return nullptr;
  const cudnnStatus_t status =
      fe::detail::set_stream(handle, c10::cuda::getCurrentCUDAStream(t.device().index()).stream());
  TORCH_CHECK(status == CUDNN_STATUS_SUCCESS, "oasis_kernels cuDNN SDPA: cudnnSetStream failed (", status, ")");
  return handle;
}

void execute(fe::graph::Graph& graph, std::unordered_map<int64_t, void*>& pack, cudnnHandle_t handle) {
  int64_t bytes = 0;
  auto status = graph.get_workspace_size(bytes);
  TORCH_CHECK(status.is_good(), "oasis_kernels cuDNN SDPA: get_workspace_size: ", status.get_message());
  // from PyTorch's caching allocator on the current stream: freed when this returns, reused by
  // later work on the same stream only after the kernels enqueued here
  auto workspace = c10::cuda::CUDACachingAllocator::get()->allocate(static_cast<size_t>(bytes));
  status = graph.execute(handle, pack, workspace.get());
  TORCH_CHECK(status.is_good(), "oasis_kernels cuDNN SDPA: execute: ", status.get_message());
}

}  // namespace

bool cudnn_sdpa_built() { return true; }

std::string cudnn_sdpa_last_decline() { return last_decline; }

bool cudnn_sdpa_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& o,
                        const at::Tensor& lse, double scale) {
  if (auto why = unsupported({&q, &k, &v, &o}, lse); !why.empty()) return declined(why);
  if (auto why = mismatched(q, k, v, o, lse); !why.empty()) return declined(why);
  const c10::cuda::CUDAGuard guard(q.device());
  cudnnHandle_t handle = handle_on(q);
  if (handle == nullptr) return declined("libcudnn.so.9 is not loaded in this process");
  // the graph declares every tensor 16-byte aligned, the Stats output too: a head slice of an
  // LSE whose N is not a multiple of 4 is not, so cuDNN writes a packed one, copied into it after
  const bool staged = reinterpret_cast<uintptr_t>(lse.data_ptr()) % 16 != 0;
  const at::Tensor stats_buffer = staged ? lse.new_empty(lse.sizes()) : lse;
  const Cached cached = graph_for(key_of(0, {&q, &k, &v, &o, &stats_buffer}), handle, [&] {
    auto graph = new_graph(q);
    auto options = fe::graph::SDPA_attributes().set_name("oasis_sdpa").set_generate_stats(true).set_attn_scale(
        scale_input(*graph));
    auto [out, stats] = graph->sdpa(graph->tensor(described(Q, "Q", q)), graph->tensor(described(K, "K", k)),
                                    graph->tensor(described(V, "V", v)), options);
    out->set_output(true).set_uid(O).set_dim(o.sizes().vec()).set_stride(o.strides().vec());
    stats->set_output(true).set_uid(STATS).set_data_type(fe::DataType_t::FLOAT);
    stats->set_dim(stats_buffer.sizes().vec()).set_stride(stats_buffer.strides().vec());
    return graph;
  });
  if (!cached.graph) return declined(cached.why);
  last_decline.clear();
  float scale_value = static_cast<float>(scale);
  std::unordered_map<int64_t, void*> pack{{Q, q.data_ptr()}, {K, k.data_ptr()},
                                          {V, v.data_ptr()}, {O, o.data_ptr()},
                                          {STATS, stats_buffer.data_ptr()}, {SCALE, &scale_value}};
  execute(*cached.graph, pack, handle);
  if (staged) lse.copy_(stats_buffer);
  return true;
}

bool cudnn_sdpa_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& o, const at::Tensor& lse, const at::Tensor& dq, const at::Tensor& dk,
                         const at::Tensor& dv, double scale) {
  if (auto why = unsupported({&q, &k, &v, &o, &dout, &dq, &dk, &dv}, lse); !why.empty()) return declined(why);
  if (auto why = mismatched(q, k, v, o, lse); !why.empty()) return declined(why);
  if (dout.sizes() != o.sizes() || dq.sizes() != q.sizes() || dk.sizes() != k.sizes() || dv.sizes() != v.sizes()) {
    return declined("sizes of dout, dq, dk, dv do not agree with out, q, k, v");
  }
  if (dout.strides() != o.strides()) return declined("dout's strides differ from out's");  // ours, not cuDNN's
  const c10::cuda::CUDAGuard guard(q.device());
  cudnnHandle_t handle = handle_on(q);
  if (handle == nullptr) return declined("libcudnn.so.9 is not loaded in this process");
  // cuDNN before 9.26 takes the backward's Stats only as a packed [B, h, N, 1] tensor, declared
  // 16-byte aligned: a head slice of the routed LSE that PyTorch calls contiguous (B == 1, a run
  // of adjacent heads) is restrided in place where its pointer is aligned, anything else copied
  at::Tensor stats = lse.contiguous();
  if (reinterpret_cast<uintptr_t>(stats.data_ptr()) % 16 != 0) stats = stats.clone(at::MemoryFormat::Contiguous);
  stats = stats.as_strided(stats.sizes(), {stats.size(1) * stats.size(2), stats.size(2), 1, 1});
  // as the API documents for the dense backends: torch.use_deterministic_algorithms decides
  // (cuDNN's default backward accumulates dQ with atomics)
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  const int64_t kind = deterministic ? 2 : 1;
  const Cached cached = graph_for(key_of(kind, {&q, &k, &v, &o, &dout, &stats, &dq, &dk, &dv}), handle, [&] {
    auto graph = new_graph(q);
    auto options = fe::graph::SDPA_backward_attributes()
                       .set_name("oasis_sdpa_backward")
                       .set_attn_scale(scale_input(*graph))
                       .set_deterministic_algorithm(deterministic);
    auto stats_input = graph->tensor(described(STATS, "Stats", stats).set_data_type(fe::DataType_t::FLOAT));
    auto [grad_q, grad_k, grad_v] =
        graph->sdpa_backward(graph->tensor(described(Q, "Q", q)), graph->tensor(described(K, "K", k)),
                             graph->tensor(described(V, "V", v)), graph->tensor(described(O, "O", o)),
                             graph->tensor(described(DO, "dO", dout)), stats_input, options);
    grad_q->set_output(true).set_uid(DQ).set_dim(dq.sizes().vec()).set_stride(dq.strides().vec());
    grad_k->set_output(true).set_uid(DK).set_dim(dk.sizes().vec()).set_stride(dk.strides().vec());
    grad_v->set_output(true).set_uid(DV).set_dim(dv.sizes().vec()).set_stride(dv.strides().vec());
    return graph;
  });
  if (!cached.graph) return declined(cached.why);
  last_decline.clear();
  float scale_value = static_cast<float>(scale);
  std::unordered_map<int64_t, void*> pack{
      {Q, q.data_ptr()},       {K, k.data_ptr()},   {V, v.data_ptr()},   {O, o.data_ptr()},
      {DO, dout.data_ptr()},   {STATS, stats.data_ptr()}, {DQ, dq.data_ptr()}, {DK, dk.data_ptr()},
      {DV, dv.data_ptr()},     {SCALE, &scale_value}};
  execute(*cached.graph, pack, handle);
  return true;
}

}  // namespace oasis

#else  // built without the cuDNN frontend headers

namespace oasis {

bool cudnn_sdpa_built() { return false; }

std::string cudnn_sdpa_last_decline() { return "built without the cuDNN frontend headers"; }

bool cudnn_sdpa_forward(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        double) {
  return false;
}

bool cudnn_sdpa_backward(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, double) {
  return false;
}

}  // namespace oasis

#endif
