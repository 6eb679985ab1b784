#include "data/fashion_mnist.h"

#include <cstdlib>
#include <stdexcept>
#include <sys/stat.h>

#include "data/idx.h"

namespace fabric::data {

std::string fashion_mnist_root() {
  const char* dir = std::getenv("FASHION_MNIST_DIR");
  return (dir && *dir) ? dir : "/usr/share/datasets/fashion-mnist";
}

TensorDataset load_fashion_mnist(Split split, const std::string& root) {
  const std::string prefix = split == Split::kTrain ? "train" : "t10k";
  const std::string images_path = root + "/" + prefix + "-images-idx3-ubyte.gz";
  const std::string labels_path = root + "/" + prefix + "-labels-idx1-ubyte.gz";
  for (const auto& path : {images_path, labels_path}) {
    struct stat info {};
    if (::stat(path.c_str(), &info) != 0) {
      throw std::runtime_error("Fashion-MNIST file not found: " + path +
                               ". Install it with `apt-get install dataset-fashion-mnist` (or "
                               "`make setup`), or set FASHION_MNIST_DIR to a folder holding " +
                               prefix + "-images-idx3-ubyte.gz and " + prefix +
                               "-labels-idx1-ubyte.gz");
    }
  }
  at::Tensor images = read_idx(images_path);
  at::Tensor labels = read_idx(labels_path);
  if (images.dim() != 3 || labels.dim() != 1 || images.size(0) != labels.size(0)) {
    throw std::runtime_error("Fashion-MNIST files in " + root +
                             " do not match: expected images [N, 28, 28] and labels [N]");
  }
  return {images.unsqueeze(1).to(at::kFloat).div_(255.0), labels.to(at::kLong)};
}

}  // namespace fabric::data
