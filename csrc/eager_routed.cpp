// The eager host path of routed attention, in C++.
//
// At small layers (S = (5, 20, 40) on the H200) the eager routed call is host-bound: the Python
// dispatch (views, copies, Triton launches, stream fork and join) costs several times the GPU
// time. `oasis_kernels/fastpath.py` records, per prepared call (oasis_kernels/call.py), what the
// Python path did (the global head runs that cuDNN serves, and each Triton launch with its
// compiled kernel, grid and arguments) and hands it to the objects below, which replay it with no
// Python in between:
//
//   RoutedForward.run(q, k, v, side_stream)                     -> [out, lse] or [] (declined)
//   RoutedForward.run_autograd(q, k, v, side_stream)            -> the same, with a C++ autograd node
//   RoutedBackward.run(dout, q, k, v, out, lse, side_stream)    -> [dq, dk, dv] or []
//   copy_pairs([(src, dst), ...])                               -> the same strided copies, for Python
//
// The autograd node replays the backward prepared for the same signature once
// `RoutedForward.set_backward` gave it one; before that (the first backward of a signature), and
// for calls the replay declines, it calls back into Python (fastpath._make_forward's fallback).
//
// A call is declined (an empty list; the caller takes the Python path) when the current stream
// is capturing a CUDA graph or a pointer is not 16-byte aligned: the recorded Triton kernels
// were specialized on aligned pointers. Everything else that the recorded launches depend on
// (shapes, strides, dtype, device, plan, scale) is the caller's cache key.
//
// The global heads run on `side_stream` (a high-priority stream, 0 for none) forked from the
// caller's stream, the Triton launches on the caller's stream, which waits for the side stream
// before returning: the schedule of `RoutedCall._run`. Whether to fork is the prepared call's
// decision (`RoutedCall.forks`), passed as a zero or non-zero `side_stream`.

#include <torch/extension.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include "copy_rows.h"
#include "cudnn_sdpa.h"

#include <array>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

// Tensors a Triton kernel argument can name (fastpath.py maps the kernels' argument names here).
enum Role : int { Q = 0, K, V, OUT, LSE, HEADS, DOUT, DQ, DK, DV, DELTA, N_ROLES };
// Kinds of kernel parameters, as Triton's launcher passes them (pointers, then scalars by type).
enum Kind : int { PTR = 0, I32 = 1, I64 = 2, F32 = 3, I8 = 4 };

using LaunchEx = CUresult (*)(const CUlaunchConfig*, CUfunction, void**, void**);

LaunchEx launch_ex() {
  // the driver API from libcuda itself, as Triton's launcher does: no link to libcuda needed
  static LaunchEx fn = [] {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (lib == nullptr) throw std::runtime_error("oasis_kernels._C: cannot dlopen libcuda.so.1");
    auto f = reinterpret_cast<LaunchEx>(dlsym(lib, "cuLaunchKernelEx"));
    if (f == nullptr) throw std::runtime_error("oasis_kernels._C: libcuda.so.1 has no cuLaunchKernelEx");
    return f;
  }();
  return fn;
}

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("oasis_kernels._C: ") + what + ": " + cudaGetErrorString(err));
  }
}

// heads start, start + step, ... < stop of a [B, N, heads, D] tensor (plan.head_runs)
using Run = std::tuple<int64_t, int64_t, int64_t>;

struct Param {
  int kind;
  int64_t ivalue;
  double fvalue;
};

// a parameter's value at the start of its 8-byte slot
template <typename T>
void put(void* slot, T value) {
  std::memcpy(slot, &value, sizeof value);
}

// One Triton kernel launch: the compiled kernel, its launch geometry and its parameters in
// signature order (constexprs left out, as Triton's launcher does).
struct TritonLaunch {
  uint64_t function = 0;
  std::array<unsigned, 3> grid{1, 1, 1};
  unsigned threads = 0, smem = 0, num_ctas = 1;
  bool cooperative = false, pdl = false;
  std::vector<Param> params;

  static TritonLaunch from_tuple(const py::tuple& t) {
    if (t.size() != 8) throw std::invalid_argument("launch spec: expected 8 fields");
    TritonLaunch l;
    l.function = t[0].cast<uint64_t>();
    auto g = t[1].cast<std::vector<unsigned>>();
    if (g.size() != 3) throw std::invalid_argument("launch spec: grid needs 3 sizes");
    std::copy(g.begin(), g.end(), l.grid.begin());
    l.threads = t[2].cast<unsigned>();
    l.smem = t[3].cast<unsigned>();
    l.num_ctas = t[4].cast<unsigned>();
    l.cooperative = t[5].cast<bool>();
    l.pdl = t[6].cast<bool>();
    for (const auto& p : t[7].cast<py::list>()) {
      auto pt = p.cast<py::tuple>();
      Param q{pt[0].cast<int>(), pt[1].cast<int64_t>(), pt[2].cast<double>()};
      if (q.kind < PTR || q.kind > I8) throw std::invalid_argument("launch spec: unknown parameter kind");
      if (q.kind == PTR && (q.ivalue < 0 || q.ivalue >= N_ROLES)) throw std::invalid_argument("launch spec: bad role");
      l.params.push_back(q);
    }
    return l;
  }

  void launch(const std::array<void*, N_ROLES>& ptrs, cudaStream_t stream) const {
    // one 8-byte slot per parameter (each holds its value at offset 0), then the global and
    // profile scratch pointers Triton appends (null: the recorded kernels need none)
    std::vector<uint64_t> slots(params.size() + 2, 0);
    std::vector<void*> argv(params.size() + 2);
    for (size_t i = 0; i < params.size(); ++i) {
      const Param& p = params[i];
      void* slot = &slots[i];
      switch (p.kind) {
        case PTR: put(slot, reinterpret_cast<uint64_t>(ptrs[p.ivalue])); break;
        case I32: put(slot, static_cast<int32_t>(p.ivalue)); break;
        case I64: put(slot, static_cast<int64_t>(p.ivalue)); break;
        case F32: put(slot, static_cast<float>(p.fvalue)); break;
        case I8: put(slot, static_cast<int8_t>(p.ivalue)); break;
      }
      argv[i] = slot;
    }
    argv[params.size()] = &slots[params.size()];
    argv[params.size() + 1] = &slots[params.size() + 1];

    CUlaunchAttribute attrs[3];
    unsigned n_attrs = 0;
    if (pdl) {
      attrs[n_attrs].id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
      attrs[n_attrs].value.programmaticStreamSerializationAllowed = 1;
      ++n_attrs;
    }
    if (cooperative) {
      attrs[n_attrs].id = CU_LAUNCH_ATTRIBUTE_COOPERATIVE;
      attrs[n_attrs].value.cooperative = 1;
      ++n_attrs;
    }
    if (num_ctas != 1) {
      attrs[n_attrs].id = CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
      attrs[n_attrs].value.clusterDim.x = num_ctas;
      attrs[n_attrs].value.clusterDim.y = 1;
      attrs[n_attrs].value.clusterDim.z = 1;
      ++n_attrs;
    }
    CUlaunchConfig config{};
    config.gridDimX = grid[0] * num_ctas;
    config.gridDimY = grid[1];
    config.gridDimZ = grid[2];
    config.blockDimX = threads;
    config.blockDimY = 1;
    config.blockDimZ = 1;
    config.sharedMemBytes = smem;
    config.hStream = reinterpret_cast<CUstream>(stream);
    config.attrs = attrs;
    config.numAttrs = n_attrs;
    if (grid[0] * grid[1] * grid[2] == 0) return;
    CUresult res = launch_ex()(&config, reinterpret_cast<CUfunction>(function), argv.data(), nullptr);
    if (res != CUDA_SUCCESS) {
      throw std::runtime_error("oasis_kernels._C: cuLaunchKernelEx failed with CUresult " + std::to_string(res));
    }
  }
};

std::vector<Run> parse_runs(const std::vector<Run>& runs) {
  for (const auto& [start, stop, step] : runs) {
    if (start < 0 || stop <= start || step < 1) throw std::invalid_argument("global head runs are (start, stop, step)");
  }
  return runs;
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status;
  check_cuda(cudaStreamIsCapturing(stream, &status), "cudaStreamIsCapturing");
  return status != cudaStreamCaptureStatusNone;
}

// A fork and a join between the caller's stream and a side stream, with this thread's events.
class Fork {
 public:
  Fork(cudaStream_t caller, cudaStream_t side, int device) : caller_(caller), side_(side) {
    if (side_ == nullptr) return;
    events_ = &events_for(device);
    check_cuda(cudaEventRecord(events_->first, caller_), "cudaEventRecord");
    check_cuda(cudaStreamWaitEvent(side_, events_->first, 0), "cudaStreamWaitEvent");
  }
  // also on an exception: kernels already launched on the side stream write tensors the caller frees
  ~Fork() {
    if (side_ == nullptr) return;
    cudaEventRecord(events_->second, side_);
    cudaStreamWaitEvent(caller_, events_->second, 0);
  }
  Fork(const Fork&) = delete;
  Fork& operator=(const Fork&) = delete;

 private:
  using Events = std::pair<cudaEvent_t, cudaEvent_t>;
  static Events& events_for(int device) {
    thread_local std::unordered_map<int, Events> by_device;
    auto it = by_device.find(device);
    if (it == by_device.end()) {
      Events e;
      check_cuda(cudaEventCreateWithFlags(&e.first, cudaEventDisableTiming), "cudaEventCreate");
      check_cuda(cudaEventCreateWithFlags(&e.second, cudaEventDisableTiming), "cudaEventCreate");
      it = by_device.emplace(device, e).first;
    }
    return it->second;
  }
  cudaStream_t caller_, side_;
  Events* events_ = nullptr;
};

// Copies src into dst (4-D views of equal sizes whose last dimension is contiguous or of
// size 1) with one launch for all pairs (copy_rows.cu); pairs it cannot describe go to copy_.
void copy_pairs(const std::vector<std::pair<at::Tensor, at::Tensor>>& pairs, cudaStream_t stream) {
  oasis::RowCopies copies{};
  for (const auto& [src, dst] : pairs) {
    bool ok = src.dim() == 4 && src.sizes() == dst.sizes() && src.scalar_type() == dst.scalar_type() &&
              copies.count < oasis::kMaxRowCopies && (src.size(3) == 1 || (src.stride(3) == 1 && dst.stride(3) == 1));
    if (ok) {
      oasis::RowCopy& c = copies.copy[copies.count];
      const int64_t elt = src.element_size();
      c.src = static_cast<const char*>(src.data_ptr());
      c.dst = static_cast<char*>(dst.data_ptr());
      c.row_bytes = src.size(3) * elt;
      uint64_t bits = reinterpret_cast<uintptr_t>(c.src) | reinterpret_cast<uintptr_t>(c.dst) |
                      static_cast<uint64_t>(c.row_bytes);
      for (int d = 0; d < 3; ++d) {
        c.sizes[d] = src.size(d);
        c.src_strides[d] = src.stride(d) * elt;
        c.dst_strides[d] = dst.stride(d) * elt;
        bits |= static_cast<uint64_t>(c.src_strides[d]) | static_cast<uint64_t>(c.dst_strides[d]);
      }
      c.vector_bytes = 16;
      while (c.vector_bytes > 1 && (bits % c.vector_bytes)) c.vector_bytes /= 2;
      ++copies.count;
    } else {
      dst.copy_(src);
    }
  }
  check_cuda(oasis::copy_rows(copies, stream), "copy_rows");
}

// [B, N, heads, D] -> the heads of `r` as [B, h, N, D] (a view), as PyTorch's SDPA ops take them
at::Tensor heads_bhnd(const at::Tensor& x, const Run& r) {
  return x.slice(2, std::get<0>(r), std::get<1>(r), std::get<2>(r)).transpose(1, 2);
}
at::Tensor heads_of(const at::Tensor& x, int64_t dim, const Run& r) {
  return x.slice(dim, std::get<0>(r), std::get<1>(r), std::get<2>(r));
}

// The tensors of the forward's roles, by role, for the recorded Triton launches.
std::array<void*, N_ROLES> forward_roles(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         const at::Tensor& out, const at::Tensor& lse, const at::Tensor& heads) {
  std::array<void*, N_ROLES> ptrs{};
  ptrs[Q] = q.data_ptr();
  ptrs[K] = k.data_ptr();
  ptrs[V] = v.data_ptr();
  ptrs[OUT] = out.data_ptr();
  ptrs[LSE] = lse.data_ptr();
  ptrs[HEADS] = heads.data_ptr();
  return ptrs;
}

// The stream of the global heads: the side stream when the call forks, else the caller's.
c10::cuda::CUDAStream global_stream(bool fork, uint64_t side, c10::DeviceIndex device) {
  return fork ? c10::cuda::getStreamFromExternal(reinterpret_cast<cudaStream_t>(side), device)
              : c10::cuda::getCurrentCUDAStream(device);
}

class RoutedBackward {
 public:
  // the local heads' two launches: the delta kernel, then the one of dQ and dK/dV programs;
  // `cudnn_direct`: the global heads' gradients straight into the routed tensors where cuDNN takes
  // the layout (the setting of the prepared call; this path reads no environment)
  RoutedBackward(std::vector<Run> global_runs, double scale, at::Tensor heads,
                 std::optional<py::tuple> delta_launch, std::optional<py::tuple> grads_launch, bool cudnn_direct)
      : runs_(parse_runs(global_runs)), scale_(scale), heads_(std::move(heads)), cudnn_direct_(cudnn_direct) {
    if (delta_launch.has_value() != grads_launch.has_value()) {
      throw std::invalid_argument("RoutedBackward: the delta and the dQ + dK/dV launches come together");
    }
    if (delta_launch) {
      delta_ = TritonLaunch::from_tuple(*delta_launch);
      grads_ = TritonLaunch::from_tuple(*grads_launch);
      has_local_ = true;
    }
    // cuDNN's RNG arguments, which it does not read at dropout 0: one tensor for every call
    // (made when the signature is prepared, outside CUDA-graph capture, as this path runs)
    seed_ = at::empty({}, heads_.options().dtype(at::kLong));
  }

  std::vector<at::Tensor> run(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& out, const at::Tensor& lse, uint64_t side) const {
    return run_with(dout, q, k, v, out, lse, side, {});
  }

  // `run_lse`: cuDNN's own log-sum-exp of each global head run, as the replayed forward kept it
  // ([B, h, N, 1]); without it each run's slice of `lse` is copied into that layout
  std::vector<at::Tensor> run_with(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, uint64_t side,
                                   const std::vector<at::Tensor>& run_lse) const {
    c10::cuda::CUDAGuard guard(q.device());
    cudaStream_t caller = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
    for (const at::Tensor* t : {&dout, &q, &k, &v, &out}) {
      if (!aligned16(*t)) return {};
    }
    // the side stream is the forward thread's (the autograd node's backward runs on autograd's
    // worker thread): if that thread has since joined it to a CUDA-graph capture, do not add to it
    if (capturing(caller) || (side != 0 && capturing(reinterpret_cast<cudaStream_t>(side)))) return {};
    at::Tensor dq = at::empty_like(q, at::MemoryFormat::Contiguous);
    at::Tensor dk = at::empty_like(k, at::MemoryFormat::Contiguous);
    at::Tensor dv = at::empty_like(v, at::MemoryFormat::Contiguous);
    bool fork = side != 0 && has_local_ && !runs_.empty();
    {
      Fork f(caller, fork ? reinterpret_cast<cudaStream_t>(side) : nullptr, q.device().index());
      if (!runs_.empty()) {
        c10::cuda::CUDAStream global = global_stream(fork, side, q.device().index());
        c10::cuda::CUDAStreamGuard sg(global);
        for (size_t i = 0; i < runs_.size(); ++i) {
          const Run& r = runs_[i];
          if (cudnn_direct_ && oasis::cudnn_sdpa_backward(heads_bhnd(dout, r), heads_bhnd(q, r), heads_bhnd(k, r), heads_bhnd(v, r),
                                         heads_bhnd(out, r), heads_of(lse, 1, r).unsqueeze(-1), heads_bhnd(dq, r),
                                         heads_bhnd(dk, r), heads_bhnd(dv, r), scale_)) {
            continue;
          }
          // undefined where the forward ran the direct path
          at::Tensor l = i < run_lse.size() && run_lse[i].defined() ? run_lse[i]
                                                                    : heads_of(lse, 1, r).contiguous().unsqueeze(-1);
          auto grads = at::_scaled_dot_product_cudnn_attention_backward(
              heads_bhnd(dout, r), heads_bhnd(q, r), heads_bhnd(k, r), heads_bhnd(v, r),
              heads_bhnd(out, r), l, seed_, seed_, at::Tensor(),
              at::Tensor(), at::Tensor(), q.size(1), k.size(1), 0.0, false, scale_);
          copy_pairs({{std::get<0>(grads), heads_bhnd(dq, r)}, {std::get<1>(grads), heads_bhnd(dk, r)},
                      {std::get<2>(grads), heads_bhnd(dv, r)}},
                     global.stream());
        }
      }
      if (has_local_) {
        // rowsum(dO * O) per local head and query, written by the delta kernel for the other
        at::Tensor delta = at::empty({q.size(0), heads_.size(0), q.size(1)}, q.options().dtype(at::kFloat));
        auto ptrs = forward_roles(q, k, v, out, lse, heads_);
        ptrs[DOUT] = dout.data_ptr();
        ptrs[DQ] = dq.data_ptr();
        ptrs[DK] = dk.data_ptr();
        ptrs[DV] = dv.data_ptr();
        ptrs[DELTA] = delta.data_ptr();
        delta_.launch(ptrs, caller);
        grads_.launch(ptrs, caller);
      }
    }
    return {dq, dk, dv};
  }

 private:
  std::vector<Run> runs_;
  double scale_;
  at::Tensor heads_;
  at::Tensor seed_;
  TritonLaunch delta_, grads_;
  bool has_local_ = false;
  bool cudnn_direct_;
};

class RoutedForward {
 public:
  RoutedForward(std::vector<Run> global_runs, double scale, at::Tensor heads,
                std::optional<py::tuple> local, bool cudnn_direct)
      : runs_(parse_runs(global_runs)), scale_(scale), heads_(std::move(heads)), cudnn_direct_(cudnn_direct) {
    if (local) local_ = TritonLaunch::from_tuple(*local), has_local_ = true;
  }

  // whether this call can be replayed (else the caller takes the Python path)
  static bool serves(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
    c10::cuda::CUDAGuard guard(q.device());
    return aligned16(q) && aligned16(k) && aligned16(v) &&
           !capturing(c10::cuda::getCurrentCUDAStream(q.device().index()).stream());
  }

  std::vector<at::Tensor> run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, uint64_t side) const {
    if (!serves(q, k, v)) return {};
    auto outs = forward(q, k, v, side);
    return {outs[0], outs[1]};
  }

  // [out, lse, then cuDNN's log-sum-exp of each global head run (kept for the backward)]
  std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, uint64_t side) const {
    c10::cuda::CUDAGuard guard(q.device());
    cudaStream_t caller = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
    const int64_t b = q.size(0), n = q.size(1), nh = q.size(2), d = q.size(3);
    at::Tensor out = at::empty({b, n, nh, d}, q.options());
    at::Tensor lse = at::empty({b, nh, n}, q.options().dtype(at::kFloat));
    bool fork = side != 0 && has_local_ && !runs_.empty();
    std::vector<at::Tensor> run_lse;
    {
      Fork f(caller, fork ? reinterpret_cast<cudaStream_t>(side) : nullptr, q.device().index());
      if (!runs_.empty()) {
        c10::cuda::CUDAStream global = global_stream(fork, side, q.device().index());
        c10::cuda::CUDAStreamGuard sg(global);
        for (const Run& r : runs_) {
          // cuDNN straight into the head slices where the extension has that path (no stores);
          // the backward then reads this run's slice of `lse`
          if (cudnn_direct_ && oasis::cudnn_sdpa_forward(heads_bhnd(q, r), heads_bhnd(k, r), heads_bhnd(v, r), heads_bhnd(out, r),
                                        heads_of(lse, 1, r).unsqueeze(-1), scale_)) {
            run_lse.emplace_back();
            continue;
          }
          auto res = at::_scaled_dot_product_cudnn_attention(heads_bhnd(q, r), heads_bhnd(k, r),
                                                             heads_bhnd(v, r), std::nullopt, true, 0.0, false,
                                                             false, scale_);
          const at::Tensor& l = std::get<1>(res);  // [B, h, N, 1]
          copy_pairs({{std::get<0>(res), heads_bhnd(out, r)}, {l, heads_of(lse, 1, r).unsqueeze(-1)}},
                     global.stream());
          run_lse.push_back(l);
        }
      }
      if (has_local_) {
        local_.launch(forward_roles(q, k, v, out, lse, heads_), caller);
      }
    }
    std::vector<at::Tensor> outs{out, lse};
    outs.insert(outs.end(), run_lse.begin(), run_lse.end());
    return outs;
  }

  // with autograd: the backward replays `backward` once set, else calls the Python `fallback`
  // (the `backward_fallback` of fastpath._make_forward: the Python path, which prepares the
  // backward and sets it here)
  std::vector<at::Tensor> run_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, uint64_t side);

  void set_backward(std::shared_ptr<RoutedBackward> backward) {
    std::lock_guard<std::mutex> lock(mutex_);
    backward_ = std::move(backward);
  }
  std::shared_ptr<RoutedBackward> backward() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return backward_;
  }
  void set_fallback(py::object fallback) { fallback_ = std::move(fallback); }
  const py::object& fallback() const { return fallback_; }

 private:
  mutable std::mutex mutex_;
  std::shared_ptr<RoutedBackward> backward_;
  py::object fallback_;
  std::vector<Run> runs_;
  double scale_;
  at::Tensor heads_;
  TritonLaunch local_;
  bool has_local_ = false;
  bool cudnn_direct_;

 public:
  int64_t id_ = -1;  // index in registry(), set by make_forward
};


// Prepared forwards that autograd nodes refer to (by index in ctx->saved_data, which holds
// IValues). They live as long as the process, as the Python cache's entries did: one per call
// signature.
std::vector<std::shared_ptr<RoutedForward>>& registry() {
  // never destroyed: the entries hold Python objects, which must not be released after the
  // interpreter has gone at exit
  static auto* forwards = new std::vector<std::shared_ptr<RoutedForward>>();
  return *forwards;
}
std::mutex registry_mutex;

int64_t register_forward(const std::shared_ptr<RoutedForward>& f) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry().push_back(f);
  return static_cast<int64_t>(registry().size()) - 1;
}

std::shared_ptr<RoutedForward> registered(int64_t id) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  return registry().at(id);
}

// The autograd node in C++: no Python in the backward when it replays (the engine runs it on
// its device thread without the GIL).
struct RoutedFunction : public torch::autograd::Function<RoutedFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q,
                                                const at::Tensor& k, const at::Tensor& v, int64_t id,
                                                int64_t side) {
    auto outs = registered(id)->forward(q, k, v, static_cast<uint64_t>(side));
    std::vector<at::Tensor> saved{q, k, v};
    saved.insert(saved.end(), outs.begin(), outs.end());  // out, lse, cuDNN's per-run lse
    ctx->save_for_backward(saved);
    outs.resize(2);
    ctx->saved_data["id"] = id;
    ctx->saved_data["side"] = side;
    // the log-sum-exp is returned as a constant, as the Python op does; its gradient is never used
    ctx->mark_non_differentiable({outs[1]});
    ctx->set_materialize_grads(false);
    return outs;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    at::Tensor none;
    if (!grads[0].defined()) return {none, none, none, none, none};
    // as the Python path's once_differentiable: the gradients are computed without a graph, and
    // under create_graph=True with a dout that requires grad they come out tied to an error
    // node, so differentiating through them fails loudly instead of giving a wrong answer
    const bool graph_wanted = torch::autograd::GradMode::is_enabled() && grads[0].requires_grad();
    at::AutoGradMode no_graph(false);
    auto saved = ctx->get_saved_variables();
    auto self = registered(ctx->saved_data["id"].toInt());
    at::Tensor dout = grads[0].contiguous();
    auto side = static_cast<uint64_t>(ctx->saved_data["side"].toInt());
    std::vector<at::Tensor> res;
    if (auto backward = self->backward()) {
      std::vector<at::Tensor> run_lse(saved.begin() + 5, saved.end());
      res = backward->run_with(dout, saved[0], saved[1], saved[2], saved[3], saved[4], side, run_lse);
    }
    if (res.empty()) {
      py::gil_scoped_acquire gil;
      auto r = self->fallback()(dout, saved[0], saved[1], saved[2], saved[3], saved[4]).cast<py::tuple>();
      res = {r[0].cast<at::Tensor>(), r[1].cast<at::Tensor>(), r[2].cast<at::Tensor>()};
    }
    if (graph_wanted) {
      at::AutoGradMode graph(true);
      auto error = std::make_shared<torch::autograd::DelayedError>(
          "routed_attention: double backward is not supported (its backward is once differentiable)", 3);
      res = (*error)({res[0].detach().requires_grad_(), res[1].detach().requires_grad_(),
                      res[2].detach().requires_grad_()});
    }
    return {res[0], res[1], res[2], none, none};
  }
};

std::vector<at::Tensor> RoutedForward::run_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    uint64_t side) {
  if (!serves(q, k, v)) return {};
  if (id_ < 0) throw std::logic_error("RoutedForward.run_autograd: not registered (use make_forward)");
  return RoutedFunction::apply(q, k, v, id_, static_cast<int64_t>(side));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "oasis_kernels' C++ extension: the eager host path of routed attention (see fastpath.py)";
  m.attr("ROLES") = py::make_tuple("Q", "K", "V", "OUT", "LSE", "HEADS", "DOUT", "DQ", "DK", "DV", "DELTA");
  // the Python side's expectation of these bindings (fastpath.ABI): a build from older sources is refused
  m.attr("ABI") = 2;
  py::class_<RoutedForward, std::shared_ptr<RoutedForward>>(m, "RoutedForward")
      .def("run", &RoutedForward::run, py::call_guard<py::gil_scoped_release>(), py::arg("q"), py::arg("k"),
           py::arg("v"), py::arg("side_stream"))
      .def("run_autograd", &RoutedForward::run_autograd, py::call_guard<py::gil_scoped_release>(), py::arg("q"),
           py::arg("k"), py::arg("v"), py::arg("side_stream"))
      .def("set_backward", &RoutedForward::set_backward, py::arg("backward"))
      .def("has_backward", [](const RoutedForward& f) { return static_cast<bool>(f.backward()); });
  m.def(
      "make_forward",
      [](std::vector<Run> global_runs, double scale, at::Tensor heads, std::optional<py::tuple> local,
         py::object fallback, bool cudnn_direct) {
        auto f = std::make_shared<RoutedForward>(std::move(global_runs), scale, std::move(heads), std::move(local),
                                                 cudnn_direct);
        f->set_fallback(std::move(fallback));
        f->id_ = register_forward(f);
        return f;
      },
      py::arg("global_runs"), py::arg("scale"), py::arg("heads"), py::arg("local"), py::arg("backward_fallback"),
      py::arg("cudnn_direct"));
  // the Python path's stores of cuDNN outputs into the routed tensors (backends/dense.py): one
  // launch on the current stream for up to four pairs, as the replay does
  m.def(
      "copy_pairs",
      [](const std::vector<std::pair<at::Tensor, at::Tensor>>& pairs) {
        if (pairs.empty()) return;
        const at::Device device = pairs.front().second.device();
        for (const auto& [src, dst] : pairs) {
          TORCH_CHECK(src.device() == device && dst.device() == device && device.is_cuda(),
                      "copy_pairs: every tensor must be on one CUDA device, got ", src.device(), " and ", dst.device());
        }
        const c10::cuda::CUDAGuard guard(device);
        copy_pairs(pairs, at::cuda::getCurrentCUDAStream(device.index()).stream());
      },
      py::arg("pairs"));
  // cuDNN attention into strided outputs (cudnn_sdpa.h): True if it ran, False if declined
  m.attr("CUDNN_SDPA") = oasis::cudnn_sdpa_built();
  m.def("cudnn_sdpa_last_decline", &oasis::cudnn_sdpa_last_decline);
  m.def("cudnn_sdpa_forward", &oasis::cudnn_sdpa_forward, py::call_guard<py::gil_scoped_release>(), py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("o"), py::arg("lse"), py::arg("scale"));
  m.def("cudnn_sdpa_backward", &oasis::cudnn_sdpa_backward, py::call_guard<py::gil_scoped_release>(),
        py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"), py::arg("lse"), py::arg("dq"),
        py::arg("dk"), py::arg("dv"), py::arg("scale"));
  py::class_<RoutedBackward, std::shared_ptr<RoutedBackward>>(m, "RoutedBackward")
      .def(py::init<std::vector<Run>, double, at::Tensor, std::optional<py::tuple>, std::optional<py::tuple>,
                    bool>(),
           py::arg("global_runs"), py::arg("scale"), py::arg("heads"), py::arg("delta"), py::arg("grads"),
           py::arg("cudnn_direct"))
      .def("run", &RoutedBackward::run, py::call_guard<py::gil_scoped_release>(), py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
           py::arg("lse"), py::arg("side_stream"));
}
