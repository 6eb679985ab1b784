#include "launchers/local_ranks.h"

#include <chrono>
#include <csignal>
#include <cstdlib>
#include <exception>
#include <string>
#include <thread>
#include <unistd.h>
#include <iostream>

#include "launchers/mpirun.h"
#include "launchers/supervisor.h"

namespace fabric::launchers {

LocalRanks::LocalRanks(int nprocs, std::vector<std::string> command, FailureHandler on_failure,
                       Node node)
    : supervisor_(std::make_unique<Supervisor>()) {
  if (command.empty()) command = own_command_line();
  if (!on_failure) {
    on_failure = [](int status) {
      std::cerr << "torchfabric: a spawned rank failed; ending the job" << std::endl;
      std::_Exit(status);
    };
  }
  const std::string address = node.main_address.empty() ? "127.0.0.1" : node.main_address;
  const int port = node.main_port > 0 ? node.main_port : free_port();
  const int world = nprocs * node.num_nodes, first = node.node_rank * nprocs;
  for (int rank = 1; rank < nprocs; ++rank) {
    supervisor_->start(first + rank, command,
                       torchrun_environment(first + rank, rank, world, nprocs, node.node_rank,
                                            address, port));
  }
  for (const auto& [key, value] :
       torchrun_environment(first, 0, world, nprocs, node.node_rank, address, port)) {
    ::setenv(key.c_str(), value.c_str(), 1);
  }
  exceptions_at_start_ = std::uncaught_exceptions();
  watcher_ = std::thread([this, on_failure] {
    status_ = supervisor_->wait_all();
    if (status_ != 0 && !stopping_) on_failure(status_);
  });
}

LocalRanks::~LocalRanks() {
  if (std::uncaught_exceptions() > exceptions_at_start_) {
    const std::string message =
        "torchfabric: rank 0 is ending with an exception; stopping the ranks it started\n";
    (void)!::write(STDERR_FILENO, message.data(), message.size());
    stop();
  } else {
    join();
  }
}

void LocalRanks::stop() {
  stopping_ = true;
  supervisor_->request_stop();  // the watcher thread signals and reaps them
  join();
}

std::vector<int> LocalRanks::pids() const {
  return std::vector<int>(supervisor_->pids().begin(), supervisor_->pids().end());
}

int LocalRanks::join() {
  if (watcher_.joinable()) watcher_.join();
  return status_;
}

}  // namespace fabric::launchers
