// fsdp's flat-buffer arithmetic (strategies/fsdp/units.h) against brute force:
// for parameters of several sizes flattened, padded to a multiple of the world
// size and split into equal shards, every rank's piece of every parameter is
// exactly the parameter's elements that fall into that rank's shard, and the
// pieces of all ranks, in rank order, rebuild each flattened parameter.
#include <gtest/gtest.h>

#include <torch/torch.h>

#include "strategies/fsdp/units.h"

namespace {

using FlatUnit = fabric::strategies::FSDPStrategy::FlatUnit;

FlatUnit layout(const std::vector<int64_t>& numels, int64_t world, int64_t rank, const at::Tensor& all) {
  FlatUnit unit;
  for (auto n : numels) {
    unit.offsets.push_back(unit.numel);
    unit.numels.push_back(n);
    unit.shapes.push_back({n});
    unit.numel += n;
  }
  unit.padded = (unit.numel + world - 1) / world * world;
  unit.shard_numel = unit.padded / world;
  unit.shard_begin = rank * unit.shard_numel;
  auto padded = torch::cat({all, torch::zeros({unit.padded - unit.numel})});
  unit.shard = padded.narrow(0, unit.shard_begin, unit.shard_numel).clone();
  return unit;
}

}  // namespace

TEST(FsdpFlat, PiecesAreExactlyEachParametersElementsInTheRanksShard) {
  // Sizes chosen so that a parameter straddles a shard boundary, one has no
  // element on some ranks, one is empty, and the last shard holds padding.
  const std::vector<std::vector<int64_t>> cases = {{3, 5, 2}, {1, 1, 1, 1, 1}, {7}, {0, 4, 0, 9}, {13, 1}};
  for (const auto& numels : cases) {
    int64_t total = 0;
    for (auto n : numels) total += n;
    const auto all = torch::arange(total, torch::kFloat) + 1;  // element k holds k + 1
    for (int64_t world : {1, 2, 3, 4, 8}) {
      std::vector<std::vector<at::Tensor>> by_param(numels.size());
      for (int64_t rank = 0; rank < world; ++rank) {
        const FlatUnit unit = layout(numels, world, rank, all);
        const int64_t begin = unit.shard_begin, end = begin + unit.shard_numel;
        for (size_t i = 0; i < numels.size(); ++i) {
          SCOPED_TRACE("numels case of " + std::to_string(total) + ", world " + std::to_string(world) +
                       ", rank " + std::to_string(rank) + ", parameter " + std::to_string(i));
          std::vector<float> expected;  // brute force: walk the parameter's elements
          for (int64_t k = unit.offsets[i]; k < unit.offsets[i] + numels[i]; ++k) {
            if (k >= begin && k < end) expected.push_back(static_cast<float>(k + 1));
          }
          const auto [lo, hi] = unit.piece_range(i);
          EXPECT_EQ(hi - lo, static_cast<int64_t>(expected.size()));
          const auto piece = unit.piece(i);
          ASSERT_EQ(piece.numel(), static_cast<int64_t>(expected.size()));
          for (size_t e = 0; e < expected.size(); ++e) EXPECT_EQ(piece[e].item<float>(), expected[e]);
          by_param[i].push_back(piece);
        }
      }
      for (size_t i = 0; i < numels.size(); ++i) {
        const auto whole = torch::cat(by_param[i]);
        EXPECT_TRUE(torch::equal(whole, all.narrow(0, layout(numels, world, 0, all).offsets[i], numels[i])))
            << "parameter " << i << " at world " << world;
      }
    }
  }
}

TEST(FsdpFlat, NoShardPiecesAreWholeShapedViews) {
  const auto all = torch::arange(6, torch::kFloat);
  FlatUnit unit = layout({2, 4}, 1, 0, all);
  unit.sharded = false;
  unit.shapes = {{2}, {2, 2}};
  EXPECT_TRUE(unit.gathered());
  EXPECT_EQ(unit.piece(1).sizes(), (std::vector<int64_t>{2, 2}));
  EXPECT_TRUE(torch::equal(unit.piece(1).reshape({-1}), all.narrow(0, 2, 4)));
}
