// The IDX reader on generated files (values, shapes, gzip and plain, and each kind
// of broken file) and on the real Fashion-MNIST data.
#include <torch/torch.h>
#include <zlib.h>

#include <cstdio>
#include <fstream>

#include "data/fashion_mnist.h"
#include "data/idx.h"
#include "data/tensor_dataset.h"
#include "fabric/fabric.h"
#include <ATen/CPUGeneratorImpl.h>
#include "test_util.h"

namespace {

std::vector<unsigned char> idx_bytes(const std::vector<uint32_t>& dims,
                                     const std::vector<unsigned char>& data) {
  std::vector<unsigned char> out = {0, 0, 0x08, static_cast<unsigned char>(dims.size())};
  for (uint32_t d : dims) {
    for (int shift = 24; shift >= 0; shift -= 8) out.push_back((d >> shift) & 0xff);
  }
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

std::string write_gz(const std::string& name, const std::vector<unsigned char>& bytes) {
  const std::string path = ::testing::TempDir() + "/" + name;
  gzFile f = gzopen(path.c_str(), "wb");
  gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size()));
  gzclose(f);
  return path;
}

std::string write_plain(const std::string& name, const std::vector<unsigned char>& bytes) {
  const std::string path = ::testing::TempDir() + "/" + name;
  std::ofstream(path, std::ios::binary)
      .write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  return path;
}

}  // namespace

TEST(Idx, ReadsGeneratedGzipAndPlainFiles) {
  std::vector<unsigned char> values(3 * 2 * 4);
  for (size_t i = 0; i < values.size(); ++i) values[i] = static_cast<unsigned char>(i * 7 % 256);
  const auto bytes = idx_bytes({3, 2, 4}, values);
  for (const auto& path : {write_gz("gen.idx.gz", bytes), write_plain("gen.idx", bytes)}) {
    auto t = fabric::data::read_idx(path);
    EXPECT_EQ(t.sizes(), (std::vector<int64_t>{3, 2, 4}));
    EXPECT_EQ(t.scalar_type(), torch::kByte);
    auto flat = t.flatten();
    for (int64_t i = 0; i < flat.numel(); ++i) {
      ASSERT_EQ(flat[i].item<int>(), values[i]) << path << " element " << i;
    }
  }
  auto labels = fabric::data::read_idx(write_gz("labels.idx.gz", idx_bytes({5}, {3, 1, 4, 1, 5})));
  EXPECT_TRUE(torch::equal(labels, torch::tensor({3, 1, 4, 1, 5}, torch::kByte)));
}

TEST(Idx, BrokenFilesAreReportedWithTheirPath) {
  const auto good = idx_bytes({4, 4}, std::vector<unsigned char>(16, 9));
  auto truncated = std::vector<unsigned char>(good.begin(), good.end() - 5);
  auto path = write_gz("truncated.idx.gz", truncated);
  EXPECT_THROW_WITH(fabric::data::read_idx(path), path, "truncated", "expected 16 bytes");

  auto bad_magic = good;
  bad_magic[0] = 0x1f;
  path = write_plain("magic.idx", bad_magic);
  EXPECT_THROW_WITH(fabric::data::read_idx(path), path, "not an IDX file");

  auto float_type = good;
  float_type[2] = 0x0d;
  path = write_gz("float.idx.gz", float_type);
  EXPECT_THROW_WITH(fabric::data::read_idx(path), path, "only unsigned bytes");

  auto extra = good;
  extra.push_back(1);
  path = write_gz("extra.idx.gz", extra);
  EXPECT_THROW_WITH(fabric::data::read_idx(path), path, "past the declared");

  EXPECT_THROW_WITH(fabric::data::read_idx("/nonexistent/x.idx.gz"), "not found",
                    "/nonexistent/x.idx.gz");
}

TEST(FashionMnist, MissingFilesNameThePathAndPackage) {
  EXPECT_THROW_WITH(fabric::data::load_fashion_mnist(fabric::data::Split::kTrain, "/no/such/dir"),
                    "/no/such/dir/train-images-idx3-ubyte.gz", "dataset-fashion-mnist",
                    "FASHION_MNIST_DIR");
}

TEST(FashionMnist, RealDataHasTheDocumentedShapeAndBalance) {
  for (auto split : {fabric::data::Split::kTrain, fabric::data::Split::kTest}) {
    const bool train = split == fabric::data::Split::kTrain;
    SCOPED_TRACE(train ? "train" : "test");
    auto data = fabric::data::load_fashion_mnist(split);
    const int64_t n = train ? 60000 : 10000;
    EXPECT_EQ(data.data().sizes(), (std::vector<int64_t>{n, 1, 28, 28}));
    EXPECT_EQ(data.target().sizes(), (std::vector<int64_t>{n}));
    EXPECT_EQ(data.data().scalar_type(), torch::kFloat);
    EXPECT_GE(data.data().min().item<float>(), 0.0f);
    EXPECT_LE(data.data().max().item<float>(), 1.0f);
    EXPECT_EQ(data.data().max().item<float>(), 1.0f);
    auto counts = torch::bincount(data.target());
    EXPECT_EQ(counts.size(0), 10);
    EXPECT_TRUE(torch::equal(counts, torch::full({10}, n / 10, torch::kLong)));
  }
}

// Batches for a CUDA device come through pinned memory with non-blocking copies
// by default, and are the same values as on the CPU; pin_memory=false turns it off.
TEST(DataLoader, PinnedNonBlockingCopiesToCudaKeepTheValues) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(3);
  fabric::data::TensorDataset data(torch::randn({12, 4}, gen), torch::arange(12));
  fabric::Fabric cpu({.accelerator = "cpu"});
  EXPECT_FALSE(cpu.setup_dataloader(data, {.batch_size = 4}).pins_memory())
      << "pinning only makes sense for CUDA";
  if (fabric::cuda_device_count() == 0) GTEST_SKIP() << "no GPU visible";
  fabric::Fabric gpu({.accelerator = "cuda", .devices = 1});
  auto pinned = gpu.setup_dataloader(data, {.batch_size = 4});
  EXPECT_TRUE(pinned.pins_memory());
  EXPECT_FALSE(gpu.setup_dataloader(data, {.batch_size = 4, .pin_memory = false}).pins_memory());
  auto reference = cpu.setup_dataloader(data, {.batch_size = 4});
  auto it = reference.begin();
  for (auto& batch : pinned) {
    ASSERT_TRUE(batch.data.is_cuda());
    EXPECT_TRUE(torch::equal(batch.data.cpu(), it->data));
    EXPECT_TRUE(torch::equal(batch.target.cpu(), it->target));
    ++it;
  }
}
