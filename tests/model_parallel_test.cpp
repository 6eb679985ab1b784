// model_parallel's single-process parts: the mesh's shape, how split
// parameters are cut and put back together, and the options' errors. The
// collectives and training run under mpirun in ddp_test.cpp (ModelParallel.*)
// and through the GPT example in example_test.cpp.
#include <gtest/gtest.h>

#include <torch/torch.h>

#include "strategies/model_parallel/model_parallel.h"
#include "strategies/model_parallel/tensor_parallel.h"
#include "strategies/registry.h"

namespace {

using fabric::strategies::ModelParallelOptions;
using fabric::strategies::resolve_mesh_shape;

ModelParallelOptions sizes(int64_t tp, int64_t dp) {
  ModelParallelOptions o;
  o.tensor_parallel_size = tp;
  o.data_parallel_size = dp;
  return o;
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(ModelParallelMesh, AutoIsDevicesPerNodeByNodes) {
  // 2 nodes of 4 devices: tp = 4 (one node), dp = 2.
  auto mesh = resolve_mesh_shape(sizes(0, 0), 8, 4);
  EXPECT_EQ(mesh.tensor_parallel, 4);
  EXPECT_EQ(mesh.data_parallel, 2);
  // One size given, the other fills the world.
  mesh = resolve_mesh_shape(sizes(2, 0), 8, 4);
  EXPECT_EQ(mesh.tensor_parallel, 2);
  EXPECT_EQ(mesh.data_parallel, 4);
  mesh = resolve_mesh_shape(sizes(0, 8), 8, 4);
  EXPECT_EQ(mesh.tensor_parallel, 1);
  EXPECT_EQ(mesh.data_parallel, 8);
}

TEST(ModelParallelMesh, ABadMeshIsAnErrorNamingTheNumbers) {
  auto message = error_of([] { resolve_mesh_shape(sizes(3, 0), 4, 4); });
  EXPECT_NE(message.find("must be the world size 4"), std::string::npos) << message;
  message = error_of([] { resolve_mesh_shape(sizes(2, 3), 4, 4); });
  EXPECT_NE(message.find("got 3 x 2"), std::string::npos) << message;
  message = error_of([] { resolve_mesh_shape(sizes(-1, 0), 4, 4); });
  EXPECT_NE(message.find("tensor_parallel_size=-1"), std::string::npos) << message;
}

TEST(ModelParallelMesh, OptionErrorsNameTheValidChoices) {
  fabric::strategies::Topology topology;
  topology.parallel_devices = {c10::Device(c10::kCPU), c10::Device(c10::kCPU)};
  topology.world_size = 2;
  fabric::strategies::ProcessGroupOptions pg;
  ModelParallelOptions options;
  options.data_parallel = "zero";
  auto message = error_of([&] { fabric::strategies::ModelParallelStrategy(topology, pg, options); });
  EXPECT_NE(message.find("valid: 'fsdp'"), std::string::npos) << message;
  options = ModelParallelOptions{};
  options.state_dict_type = "partial";
  message = error_of([&] { fabric::strategies::ModelParallelStrategy(topology, pg, options); });
  EXPECT_NE(message.find("valid: 'full'"), std::string::npos) << message;
  // The strategy is in the table, and describes itself.
  const auto names = fabric::strategies::valid_strategies();
  EXPECT_NE(std::find(names.begin(), names.end(), "model_parallel"), names.end());
  // Rank 3 of a 2 x 2 mesh: tensor-parallel rank 1 of data-parallel rank 1.
  topology.parallel_devices.resize(4, c10::Device(c10::kCPU));
  topology.world_size = 4;
  topology.global_rank = topology.local_rank = 3;
  fabric::strategies::ModelParallelStrategy mesh(topology, pg, sizes(2, 2));
  EXPECT_EQ(mesh.tensor_parallel_rank(), 1);
  EXPECT_EQ(mesh.data_parallel_rank(), 1);
  EXPECT_EQ(mesh.data_parallel_size(), 2);
}

// A fused q/k/v weight (3 blocks of rows) cut for 2 ranks: each rank holds its
// rows of every block, and the pieces put back give the whole.
TEST(TensorParallelSplit, StridedPiecesHoldEachBlocksPartAndReassemble) {
  auto full = torch::arange(12 * 2, torch::kFloat).view({12, 2});
  const fabric::tp::Split qkv{0, 3};
  auto r0 = fabric::tp::shard_of(full, qkv, 0, 2), r1 = fabric::tp::shard_of(full, qkv, 1, 2);
  // Blocks of 4 rows: rank 0 gets rows 0-1, 4-5, 8-9.
  EXPECT_TRUE(torch::equal(r0, torch::cat({full.slice(0, 0, 2), full.slice(0, 4, 6), full.slice(0, 8, 10)})));
  EXPECT_TRUE(torch::equal(r1, torch::cat({full.slice(0, 2, 4), full.slice(0, 6, 8), full.slice(0, 10, 12)})));
  EXPECT_TRUE(torch::equal(fabric::tp::unshard({r0, r1}, qkv), full));
  // By columns (a row-parallel weight).
  const fabric::tp::Split columns{1, 1};
  auto c0 = fabric::tp::shard_of(full.t(), columns, 0, 2), c1 = fabric::tp::shard_of(full.t(), columns, 1, 2);
  EXPECT_TRUE(torch::equal(c0, full.t().slice(1, 0, 6)));
  EXPECT_TRUE(torch::equal(fabric::tp::unshard({c0, c1}, columns), full.t()));
  auto message = error_of([&] { fabric::tp::shard_of(full, {0, 3}, 0, 3); });
  EXPECT_NE(message.find("not divisible by the tensor-parallel size 3"), std::string::npos) << message;
}

// With a group of one (every strategy but model_parallel) the layers compute
// exactly what the plain layers they were built from compute.
TEST(TensorParallelSplit, AGroupOfOneIsThePlainLayer) {
  torch::manual_seed(3);
  torch::nn::Linear full(5, 6);
  fabric::tp::ColumnParallelLinear column(fabric::tp::Group{}, full);
  fabric::tp::RowParallelLinear row(fabric::tp::Group{}, full);
  torch::nn::Embedding embedding_full(7, 5);
  fabric::tp::VocabParallelEmbedding embedding(fabric::tp::Group{}, embedding_full);
  auto x = torch::randn({4, 5});
  EXPECT_TRUE(torch::equal(column(x), full(x)));
  EXPECT_TRUE(torch::equal(row(x), full(x)));
  auto ids = torch::tensor({0, 6, 3}, torch::kLong);
  EXPECT_TRUE(torch::equal(embedding(ids), embedding_full(ids)));
  auto logits = torch::randn({3, 7}), targets = torch::tensor({1, 2, 6}, torch::kLong);
  EXPECT_TRUE(torch::equal(fabric::tp::vocab_parallel_cross_entropy(logits, targets, {}),
                           torch::cross_entropy_loss(logits, targets)));
}
