// Fashion-MNIST as a TensorDataset: images float32 [N, 1, 28, 28] scaled to [0, 1],
// labels int64 [N]. The files come from Debian's `dataset-fashion-mnist` package
// (/usr/share/datasets/fashion-mnist); FASHION_MNIST_DIR points elsewhere.
#pragma once

#include <string>

#include "data/tensor_dataset.h"

namespace fabric::data {

enum class Split { kTrain, kTest };

// $FASHION_MNIST_DIR if set, else /usr/share/datasets/fashion-mnist.
std::string fashion_mnist_root();

// Loads the 60000 training or 10000 test images. A missing file is an error naming
// the path and how to get it.
TensorDataset load_fashion_mnist(Split split, const std::string& root = fashion_mnist_root());

}  // namespace fabric::data
