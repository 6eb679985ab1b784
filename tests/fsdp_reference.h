// What the tests that run tests/fsdp_worker share (fsdp_test.cpp, deepspeed_test.cpp):
// running it under mpirun, the one-process references on the concatenated
// batch, and comparing what the ranks wrote with them.
#pragma once

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "checkpoint/filesystem.h"
#include "fsdp_model.h"
#include "mpi_test_util.h"
#include "test_util.h"

extern std::string g_fsdp_worker;  // set by main() in ddp_test.cpp

namespace fsdp_reference {

// Runs the worker under mpirun in the fresh directory TempDir()/name; returns it.
inline std::string run_fsdp_worker(const std::string& name, const std::string& mode,
                                   const std::string& flags, int ranks = 2) {
  const std::string dir = ::testing::TempDir() + "/" + name;
  fabric::fs::remove_all(dir);
  fabric::fs::make_directories(dir);
  // A bounded run: ranks that fall out of step hang instead of failing.
  auto result = testutil::run_command("timeout -k 10 300 " + testutil::mpirun(ranks) + " " + g_fsdp_worker +
                                      " " + mode + " " + dir + " " + flags);
  EXPECT_EQ(result.status, 0) << result.output;
  return dir;
}

struct Reference {
  std::vector<torch::Tensor> params;
  std::vector<double> norms;
};

// One process, the whole 16-row batch, 10 steps.
inline Reference one_process(const std::string& optimizer_name, bool sequential = false, double clip = 0,
                      const std::vector<std::string>& frozen = {}) {
  torch::manual_seed(0);
  auto model = std::make_shared<FsdpNetImpl>(sequential);
  fsdp_freeze(*model, frozen);
  auto optimizer = fsdp_optimizer(optimizer_name, model->parameters());
  Reference ref;
  for (int step = 0; step < 10; ++step) {
    auto [x, y] = fsdp_global_batch(step);
    optimizer->zero_grad();
    torch::mse_loss(model->forward(x), y).backward();
    if (clip > 0) ref.norms.push_back(torch::nn::utils::clip_grad_norm_(model->parameters(), clip));
    optimizer->step();
  }
  for (const auto& p : model->parameters()) ref.params.push_back(p.detach().clone());
  return ref;
}

inline void expect_close(const std::vector<torch::Tensor>& expected, const std::string& dir,
                  double tolerance = 1e-5, const std::string& file = "params", int ranks = 2) {
  for (int rank = 0; rank < ranks; ++rank) {
    SCOPED_TRACE(file + " of rank " + std::to_string(rank));
    const auto got = testutil::read_tensor_list(dir + "/" + file + "_rank" + std::to_string(rank) + ".pt");
    ASSERT_EQ(got.size(), expected.size());
    for (size_t i = 0; i < got.size(); ++i) {
      EXPECT_TRUE(torch::allclose(got[i], expected[i].to(torch::kFloat), tolerance, tolerance))
          << "tensor " << i << " max diff " << (got[i] - expected[i]).abs().max().item<double>();
    }
  }
}

// The worker's FsdpAuxNet modes in one process: the gradient DDP would average.
inline std::vector<torch::Tensor> aux_one_process(const std::string& mode) {
  torch::manual_seed(0);
  auto model = std::make_shared<FsdpAuxNetImpl>();
  torch::optim::Adam optimizer(model->parameters(), 1e-2);
  for (int step = 0; step < 10; ++step) {
    auto [x, y] = fsdp_global_batch(step);
    optimizer.zero_grad();
    if (mode == "conditional") {
      auto o = model->forward(x);
      // Rank 1 (rows 8-15) alone adds the aux term: half of it in the average.
      auto loss = torch::mse_loss(o.out, y) + fsdp_side_term(o.side) +
                  0.5 * fsdp_aux_term(o.aux.narrow(0, 8, 8));
      loss.backward();
    } else {  // accumulate_partial: micro-batch m is rows 4m..4m+3 of each rank's half
      for (int m = 0; m < 2; ++m) {
        auto rows = torch::cat({torch::arange(4 * m, 4 * m + 4), torch::arange(8 + 4 * m, 12 + 4 * m)});
        auto o = model->forward(x.index_select(0, rows));
        auto loss = torch::mse_loss(o.out, y.index_select(0, rows));
        if (m == 0) loss = loss + fsdp_side_term(o.side);
        (loss / 2).backward();
      }
    }
    optimizer.step();
  }
  std::vector<torch::Tensor> out;
  for (const auto& p : model->parameters()) out.push_back(p.detach().clone());
  return out;
}

}  // namespace fsdp_reference
