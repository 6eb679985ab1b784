#include "strategies/mpi_backend.h"

// C API only: the deprecated MPI C++ bindings need libmpi_cxx.
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>

#include <algorithm>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <future>
#include <mutex>
#include <stdexcept>
#include <thread>

#include <ATen/core/ivalue.h>
#include <ATen/ops/empty.h>

namespace fabric::strategies {
namespace {

struct MPIEnvironment {
  MPIEnvironment() {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (!initialized) {
      int provided = 0;
      MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided);
      if (provided < MPI_THREAD_SERIALIZED) {
        throw std::runtime_error("Open MPI does not provide MPI_THREAD_SERIALIZED");
      }
      owner = true;
    }
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
  }
  ~MPIEnvironment() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (owner && !finalized) MPI_Finalize();
  }
  bool owner = false;
  int rank = 0, size = 1;
};

MPIEnvironment& environment() {
  static MPIEnvironment env;
  return env;
}

void check_tensor(const at::Tensor& t, const char* op) {
  if (!t.device().is_cpu()) {
    throw std::invalid_argument(std::string("mpi backend: ") + op + " got a tensor on " +
                                t.device().str() +
                                "; the mpi backend handles CPU tensors (use nccl for CUDA)");
  }
}

MPI_Datatype mpi_type(c10::ScalarType type) {
  switch (type) {
    case c10::ScalarType::Float: return MPI_FLOAT;
    case c10::ScalarType::Double: return MPI_DOUBLE;
    case c10::ScalarType::Long: return MPI_INT64_T;
    case c10::ScalarType::Int: return MPI_INT32_T;
    case c10::ScalarType::Short: return MPI_INT16_T;
    case c10::ScalarType::Char: return MPI_INT8_T;
    case c10::ScalarType::Byte: return MPI_UINT8_T;
    case c10::ScalarType::Bool: return MPI_C_BOOL;
    default: return MPI_DATATYPE_NULL;
  }
}

MPI_Op mpi_op(const c10d::ReduceOp& op) {
  switch (op.op_) {
    case c10d::ReduceOp::SUM:
    case c10d::ReduceOp::AVG: return MPI_SUM;
    case c10d::ReduceOp::PRODUCT: return MPI_PROD;
    case c10d::ReduceOp::MIN: return MPI_MIN;
    case c10d::ReduceOp::MAX: return MPI_MAX;
    default:
      throw std::invalid_argument(
          "mpi backend: unsupported reduce op; valid ops are SUM, AVG, PRODUCT, MIN, MAX");
  }
}

// Runs `fn` on a contiguous tensor of an MPI-reducible type and writes the result back.
template <typename F>
void with_mpi_buffer(at::Tensor& tensor, F&& fn) {
  const bool half = tensor.scalar_type() == c10::ScalarType::Half ||
                    tensor.scalar_type() == c10::ScalarType::BFloat16;
  if (!half && tensor.is_contiguous()) {
    fn(tensor);
    return;
  }
  at::Tensor buffer = half ? tensor.to(c10::ScalarType::Float).contiguous() : tensor.contiguous();
  fn(buffer);
  tensor.copy_(buffer);
}

// MPI counts are ints: a tensor of 2 GiB or more (one fp32 embedding of a
// 128k vocabulary at width 4096) goes in pieces of at most this many elements
// or bytes, or through a derived datatype.
constexpr int64_t kMaxCount = int64_t{1} << 30;

void check_mpi(int code, const char* what) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(code, text, &length);
  throw std::runtime_error(std::string("mpi backend: ") + what + " failed: " + std::string(text, length));
}

// One rank's `count` bytes (count <= kMaxCount) with an extent of `stride`
// bytes: rank r's piece lands `stride` bytes after rank r-1's.
class StridedBytes {
 public:
  StridedBytes(int64_t count, int64_t stride) {
    MPI_Datatype piece;
    check_mpi(MPI_Type_contiguous(static_cast<int>(count), MPI_BYTE, &piece), "MPI_Type_contiguous");
    check_mpi(MPI_Type_create_resized(piece, 0, static_cast<MPI_Aint>(stride), &type_),
              "MPI_Type_create_resized");
    MPI_Type_free(&piece);
    check_mpi(MPI_Type_commit(&type_), "MPI_Type_commit");
  }
  ~StridedBytes() { MPI_Type_free(&type_); }
  StridedBytes(const StridedBytes&) = delete;
  StridedBytes& operator=(const StridedBytes&) = delete;
  MPI_Datatype get() const { return type_; }

 private:
  MPI_Datatype type_;
};

// All-gathers `bytes` bytes of each rank into `out` (rank-major), in pieces.
void allgather_bytes(const char* send, char* out, int64_t bytes, MPI_Comm comm) {
  if (bytes <= kMaxCount) {
    check_mpi(MPI_Allgather(send, static_cast<int>(bytes), MPI_BYTE, out, static_cast<int>(bytes),
                            MPI_BYTE, comm), "MPI_Allgather");
    return;
  }
  for (int64_t offset = 0; offset < bytes; offset += kMaxCount) {
    const int64_t n = std::min(kMaxCount, bytes - offset);
    StridedBytes type(n, bytes);
    check_mpi(MPI_Allgather(send + offset, static_cast<int>(n), MPI_BYTE, out + offset, 1, type.get(),
                            comm), "MPI_Allgather");
  }
}

// The one thread that makes every MPI call of the process, for all backends, in
// submission order (MPI_THREAD_SERIALIZED allows one caller at a time). Never
// destroyed: a backend drains its own jobs before it goes, and at exit the
// thread waits idle while MPI_Finalize runs.
class Executor {
 public:
  static Executor& get() {
    static Executor* executor = new Executor;
    return *executor;
  }
  void submit(std::function<void()> job) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queue_.push_back(std::move(job));
    }
    cv_.notify_one();
  }
  // Runs `fn` on the worker after everything submitted before it; rethrows its error.
  void run_and_wait(const std::function<void()>& fn) {
    if (std::this_thread::get_id() == worker_.get_id()) {
      fn();
      return;
    }
    std::promise<void> done;
    auto future = done.get_future();
    submit([&] {
      try {
        fn();
        done.set_value();
      } catch (...) {
        done.set_exception(std::current_exception());
      }
    });
    future.get();
  }

 private:
  Executor() {
    worker_ = std::thread([this] { loop(); });
    worker_.detach();
  }
  void loop() {
    for (;;) {
      std::function<void()> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        cv_.wait(lock, [this] { return !queue_.empty(); });
        job = std::move(queue_.front());
        queue_.pop_front();
      }
      job();
    }
  }
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  std::thread worker_;
};

}  // namespace

struct MPIBackend::Communicator {
  MPI_Comm comm = MPI_COMM_WORLD;
  int rank = 0, size = 1;
};

std::pair<int, int> mpi_world() {
  auto& env = environment();
  return {env.rank, env.size};
}

bool launched_by_mpi() {
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK"}) {
    const char* value = std::getenv(name);
    if (value && *value) return true;
  }
  return false;
}

class MPIBackend::Work : public c10d::Work {
 public:
  Work(int rank, c10d::OpType type, const char* name, int64_t seq, std::vector<at::Tensor> outputs)
      : c10d::Work(rank, type),
        name(name),
        seq(seq),
        outputs_(std::move(outputs)),
        future_(c10::make_intrusive<at::ivalue::Future>(
            c10::ListType::create(c10::TensorType::get()))) {}

  std::vector<at::Tensor> result() override { return outputs_; }
  c10::intrusive_ptr<c10::ivalue::Future> getFuture() override { return future_; }

  void run(const std::function<void()>& fn) {
    timing.start = std::chrono::steady_clock::now();
    std::exception_ptr error;
    try {
      fn();
    } catch (...) {
      error = std::current_exception();
    }
    timing.end = std::chrono::steady_clock::now();
    finish(error);
    if (error) {
      future_->setError(error);
    } else {
      future_->markCompleted(c10::IValue(outputs_));
    }
  }

  CollectiveTiming timing;
  const char* name;  // for the watchdog's report
  int64_t seq;       // issue order, 1, 2, ... (0 without a watchdog)

 private:
  std::vector<at::Tensor> outputs_;
  c10::intrusive_ptr<at::ivalue::Future> future_;
};

namespace {
std::shared_ptr<MPIBackend::Communicator> make_communicator(const MPIBackendOptions& options) {
  auto comm = std::make_shared<MPIBackend::Communicator>();
  const auto [rank, size] = mpi_world();
  comm->rank = rank;
  comm->size = size;
  if (options.split_color < 0) return comm;
  Executor::get().run_and_wait([&] {
    MPI_Comm split = MPI_COMM_NULL;
    check_mpi(MPI_Comm_split(MPI_COMM_WORLD, options.split_color, options.split_key, &split),
              "MPI_Comm_split");
    comm->comm = split;
    MPI_Comm_rank(split, &comm->rank);
    MPI_Comm_size(split, &comm->size);
  });
  return comm;
}
}  // namespace

MPIBackend::MPIBackend(MPIBackendOptions options)
    : MPIBackend(options, make_communicator(options)) {}

MPIBackend::MPIBackend(MPIBackendOptions options, std::shared_ptr<Communicator> comm)
    : c10d::Backend(comm->rank, comm->size), comm_(std::move(comm)) {
  if (options.collective_timeout.count() < 0) {
    throw std::invalid_argument("mpi backend: collective_timeout must be 0 (off) or positive");
  }
  if (options.collective_timeout.count() > 0 && getSize() > 1 && options.split_color < 0) {
    CollectiveWatchdogOptions watch;
    watch.timeout = options.collective_timeout;
    watch.rank = getRank();
    watch.world_size = getSize();
    watch.store = options.store;
    watchdog_ = std::make_unique<CollectiveWatchdog>(std::move(watch));
  }
}

MPIBackend::~MPIBackend() {
  // Everything this backend submitted has run once this returns; then its
  // communicator is freed, on the worker like every MPI call.
  auto comm = comm_;
  try {
    Executor::get().run_and_wait([comm] {
      int finalized = 0;
      MPI_Finalized(&finalized);
      if (!finalized && comm->comm != MPI_COMM_WORLD && comm->comm != MPI_COMM_NULL) {
        MPI_Comm_free(&comm->comm);
      }
    });
  } catch (...) {
    // A destructor cannot report it; the communicator goes with the process.
  }
  watchdog_.reset();
}

c10::intrusive_ptr<c10d::Work> MPIBackend::enqueue(c10d::OpType type, const char* name,
                                                   std::vector<at::Tensor> outputs,
                                                   std::function<void()> run) {
  const int64_t seq = watchdog_ ? watchdog_->issued(name) : 0;
  auto work = c10::make_intrusive<Work>(getRank(), type, name, seq, std::move(outputs));
  CollectiveWatchdog* watchdog = watchdog_.get();
  Executor::get().submit([work, watchdog, run = std::move(run)] {
    if (watchdog) watchdog->started(work->seq, work->name);
    work->run(run);
    if (watchdog) watchdog->finished(work->seq);
  });
  return work;
}

c10::intrusive_ptr<c10d::Work> MPIBackend::broadcast(std::vector<at::Tensor>& tensors,
                                                     const c10d::BroadcastOptions& opts) {
  for (const auto& t : tensors) check_tensor(t, "broadcast");
  const int root = static_cast<int>(opts.rootRank);
  return enqueue(c10d::OpType::BROADCAST, "broadcast", tensors, [tensors, root, comm = comm_]() mutable {
    for (auto& tensor : tensors) {
      at::Tensor buffer = tensor.is_contiguous() ? tensor : tensor.contiguous();
      char* data = static_cast<char*>(buffer.data_ptr());
      const int64_t bytes = static_cast<int64_t>(buffer.nbytes());
      for (int64_t offset = 0; offset < bytes; offset += kMaxCount) {
        check_mpi(MPI_Bcast(data + offset, static_cast<int>(std::min(kMaxCount, bytes - offset)),
                            MPI_BYTE, root, comm->comm), "MPI_Bcast");
      }
      if (!buffer.is_same(tensor)) tensor.copy_(buffer);
    }
  });
}

c10::intrusive_ptr<c10d::Work> MPIBackend::allreduce(std::vector<at::Tensor>& tensors,
                                                     const c10d::AllreduceOptions& opts) {
  for (const auto& t : tensors) {
    check_tensor(t, "allreduce");
    const bool half = t.scalar_type() == c10::ScalarType::Half ||
                      t.scalar_type() == c10::ScalarType::BFloat16;
    if (!half && mpi_type(t.scalar_type()) == MPI_DATATYPE_NULL) {
      throw std::invalid_argument(std::string("mpi backend: allreduce of dtype ") +
                                  c10::toString(t.scalar_type()) + " is not supported");
    }
  }
  const MPI_Op op = mpi_op(opts.reduceOp);
  const bool average = opts.reduceOp.op_ == c10d::ReduceOp::AVG;
  const int size = getSize();
  return enqueue(c10d::OpType::ALLREDUCE, "allreduce", tensors, [tensors, op, average, size, comm = comm_]() mutable {
    for (auto& tensor : tensors) {
      with_mpi_buffer(tensor, [&](at::Tensor& buffer) {
        char* data = static_cast<char*>(buffer.data_ptr());
        const int64_t numel = buffer.numel(), item = static_cast<int64_t>(buffer.element_size());
        for (int64_t offset = 0; offset < numel; offset += kMaxCount) {
          check_mpi(MPI_Allreduce(MPI_IN_PLACE, data + offset * item,
                                  static_cast<int>(std::min(kMaxCount, numel - offset)),
                                  mpi_type(buffer.scalar_type()), op, comm->comm),
                    "MPI_Allreduce");
        }
        if (average) buffer.div_(size);
      });
    }
  });
}

c10::intrusive_ptr<c10d::Work> MPIBackend::allgather(
    std::vector<std::vector<at::Tensor>>& outputs, std::vector<at::Tensor>& inputs,
    const c10d::AllgatherOptions& /*opts*/) {
  if (inputs.size() != 1 || outputs.size() != 1 ||
      outputs[0].size() != static_cast<size_t>(getSize())) {
    throw std::invalid_argument(
        "mpi backend: allgather takes one input tensor and one list of world_size outputs");
  }
  check_tensor(inputs[0], "allgather");
  for (const auto& out : outputs[0]) {
    if (out.sizes() != inputs[0].sizes() || out.scalar_type() != inputs[0].scalar_type()) {
      throw std::invalid_argument("mpi backend: allgather outputs must match the input's shape "
                                  "and dtype");
    }
  }
  auto input = inputs[0];
  auto outs = outputs[0];
  const int size = getSize();
  return enqueue(c10d::OpType::ALLGATHER, "allgather", outs, [input, outs, size, comm = comm_]() mutable {
    at::Tensor send = input.contiguous();
    at::Tensor recv = at::empty({size * send.numel()}, send.options());
    allgather_bytes(static_cast<const char*>(send.data_ptr()), static_cast<char*>(recv.data_ptr()),
                    static_cast<int64_t>(send.nbytes()), comm->comm);
    for (int r = 0; r < size; ++r) {
      outs[r].copy_(recv.narrow(0, r * send.numel(), send.numel()).view(send.sizes()));
    }
  });
}

c10::intrusive_ptr<c10d::Work> MPIBackend::_allgather_base(at::Tensor& output, at::Tensor& input,
                                                           const c10d::AllgatherOptions& /*opts*/) {
  check_tensor(input, "_allgather_base");
  check_tensor(output, "_allgather_base");
  if (output.numel() != input.numel() * getSize() ||
      output.scalar_type() != input.scalar_type() || !output.is_contiguous()) {
    throw std::invalid_argument(
        "mpi backend: _allgather_base needs a contiguous output of world_size x the input's "
        "elements, same dtype (got " + std::to_string(output.numel()) + " vs " +
        std::to_string(input.numel()) + " x " + std::to_string(getSize()) + ")");
  }
  auto in = input, out = output;
  return enqueue(c10d::OpType::_ALLGATHER_BASE, "all_gather_into_tensor", {out}, [in, out, comm = comm_]() mutable {
    at::Tensor send = in.contiguous();
    allgather_bytes(static_cast<const char*>(send.data_ptr()), static_cast<char*>(out.data_ptr()),
                    static_cast<int64_t>(send.nbytes()), comm->comm);
  });
}

c10::intrusive_ptr<c10d::Work> MPIBackend::_reduce_scatter_base(
    at::Tensor& output, at::Tensor& input, const c10d::ReduceScatterOptions& opts) {
  check_tensor(input, "_reduce_scatter_base");
  check_tensor(output, "_reduce_scatter_base");
  if (input.numel() != output.numel() * getSize() ||
      output.scalar_type() != input.scalar_type()) {
    throw std::invalid_argument(
        "mpi backend: _reduce_scatter_base needs an input of world_size x the output's "
        "elements, same dtype (got " + std::to_string(input.numel()) + " vs " +
        std::to_string(output.numel()) + " x " + std::to_string(getSize()) + ")");
  }
  const MPI_Op op = mpi_op(opts.reduceOp);
  const bool average = opts.reduceOp.op_ == c10d::ReduceOp::AVG;
  const int size = getSize();
  auto in = input, out = output;
  return enqueue(c10d::OpType::_REDUCE_SCATTER_BASE, "reduce_scatter_tensor", {out}, [in, out, op, average, size, comm = comm_]() mutable {
    // bf16/fp16 are reduced in fp32 (MPI has no such types), then cast back.
    const bool half = in.scalar_type() == c10::ScalarType::Half ||
                      in.scalar_type() == c10::ScalarType::BFloat16;
    at::Tensor send = half ? in.to(c10::ScalarType::Float).contiguous() : in.contiguous();
    at::Tensor recv = at::empty({out.numel()}, send.options());
    const int64_t n = recv.numel();
    if (n <= kMaxCount) {
      check_mpi(MPI_Reduce_scatter_block(send.data_ptr(), recv.data_ptr(), static_cast<int>(n),
                                         mpi_type(send.scalar_type()), op, comm->comm),
                "MPI_Reduce_scatter_block");
    } else {
      // In pieces: piece [o, o + k) of every rank's block, packed rank-major
      // (smaller pieces: each is copied once).
      constexpr int64_t kPiece = int64_t{1} << 28;
      auto blocks = send.view({size, n});
      for (int64_t offset = 0; offset < n; offset += kPiece) {
        const int64_t k = std::min(kPiece, n - offset);
        at::Tensor packed = blocks.narrow(1, offset, k).contiguous();
        check_mpi(MPI_Reduce_scatter_block(packed.data_ptr(), recv.narrow(0, offset, k).data_ptr(),
                                           static_cast<int>(k), mpi_type(send.scalar_type()), op,
                                           comm->comm), "MPI_Reduce_scatter_block");
      }
    }
    if (average) recv.div_(size);
    out.view({-1}).copy_(recv);
  });
}

c10::intrusive_ptr<c10d::Work> MPIBackend::barrier(const c10d::BarrierOptions& /*opts*/) {
  return enqueue(c10d::OpType::BARRIER, "barrier", {}, [comm = comm_] { MPI_Barrier(comm->comm); });
}

std::optional<CollectiveTiming> collective_timing(const c10::intrusive_ptr<c10d::Work>& work) {
  if (auto* mpi = dynamic_cast<MPIBackend::Work*>(work.get())) return mpi->timing;
  return std::nullopt;
}

}  // namespace fabric::strategies
