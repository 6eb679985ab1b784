#include "strategies/deepspeed/config.h"

#include <cmath>
#include <fstream>
#include <set>
#include <sstream>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "util/quoted_list.h"

namespace fabric::strategies {
namespace {

using json = nlohmann::json;

class Reader {
 public:
  Reader(std::string origin, DeepSpeedConfigResult& result) : origin_(std::move(origin)), result_(result) {}

  [[noreturn]] void fail(const std::string& key, const std::string& what) const {
    throw std::invalid_argument("deepspeed config " + origin_ + ": '" + key + "' " + what);
  }
  static bool is_auto(const json& v) { return v.is_string() && v.get<std::string>() == "auto"; }

  bool boolean(const json& v, const std::string& key) const {
    if (!v.is_boolean()) fail(key, "must be true or false, got " + v.dump());
    return v.get<bool>();
  }
  double number(const json& v, const std::string& key, double min) const {
    if (!v.is_number()) fail(key, "must be a number, got " + v.dump());
    const double x = v.get<double>();
    if (!std::isfinite(x) || x < min) fail(key, "must be >= " + std::to_string(min) + ", got " + v.dump());
    return x;
  }
  int64_t integer(const json& v, const std::string& key, int64_t min) const {
    // DeepSpeed's own examples write sizes as 5e8: accept a float with no fraction.
    if (!v.is_number()) fail(key, "must be an integer, got " + v.dump());
    const double x = v.get<double>();
    if (x != std::floor(x) || !std::isfinite(x)) fail(key, "must be an integer, got " + v.dump());
    if (x < static_cast<double>(min)) fail(key, "must be >= " + std::to_string(min) + ", got " + v.dump());
    return static_cast<int64_t>(x);
  }
  void ignore(const std::string& key) { result_.ignored.push_back(key); }

 private:
  std::string origin_;
  DeepSpeedConfigResult& result_;
};

// offload_optimizer / offload_param: {"device": "cpu"|"none"|"nvme", ...}
bool offload_device(Reader& r, const json& section, const std::string& key) {
  if (!section.is_object()) r.fail(key, "must be an object such as {\"device\": \"cpu\"}");
  bool on = false;
  for (const auto& [name, value] : section.items()) {
    const std::string path = key + "." + name;
    if (name == "device") {
      const std::string device = value.is_string() ? value.get<std::string>() : value.dump();
      if (device == "nvme") {
        r.fail(path, "= \"nvme\" is not supported (torchfabric offloads to host memory only). "
                     "Valid values: \"cpu\", \"none\"");
      }
      if (device != "cpu" && device != "none") {
        r.fail(path, "= " + value.dump() + " is not supported. Valid values: \"cpu\", \"none\"");
      }
      on = device == "cpu";
    } else if (name == "pin_memory") {
      r.boolean(value, path);  // host memory is pinned on CUDA anyway
    } else {
      r.ignore(path);  // buffer_count, fast_init, ratio, ...: tuning
    }
  }
  return on;
}

void read_zero(Reader& r, const json& zero, DeepSpeedOptions& options) {
  if (!zero.is_object()) r.fail("zero_optimization", "must be an object");
  for (const auto& [name, value] : zero.items()) {
    const std::string key = "zero_optimization." + name;
    if (name == "stage") {
      const int64_t stage = r.integer(value, key, 0);
      if (stage == 0) {
        r.fail(key, "= 0 is plain data parallelism: use strategy=\"ddp\" (valid stages: 1, 2, 3)");
      }
      if (stage > 3) r.fail(key, "= " + value.dump() + " does not exist. Valid values: 1, 2, 3");
      options.stage = static_cast<int>(stage);
    } else if (name == "offload_optimizer") {
      options.offload_optimizer = offload_device(r, value, key);
    } else if (name == "offload_param") {
      options.offload_parameters = offload_device(r, value, key);
    } else if (name == "reduce_bucket_size") {
      if (!Reader::is_auto(value)) options.reduce_bucket_size = r.integer(value, key, 1);
    } else if (name == "allgather_bucket_size") {
      if (!Reader::is_auto(value)) options.allgather_bucket_size = r.integer(value, key, 1);
    } else if (name == "overlap_comm") {
      options.overlap_comm = r.boolean(value, key);
    } else if (name == "contiguous_gradients") {
      options.contiguous_gradients = r.boolean(value, key);
    } else if (name == "allgather_partitions" || name == "reduce_scatter") {
      // The only way here: false would ask for a broadcast / all-reduce instead.
      if (!r.boolean(value, key)) r.fail(key, "= false is not supported (only true)");
    } else {
      // stage3_* prefetch/persistence knobs, sub_group_size, round_robin_gradients,
      // elastic_checkpoint, ...: performance tuning, not the result.
      r.ignore(key);
    }
  }
}

void read_fp16(Reader& r, const json& fp16, DeepSpeedOptions& options, DeepSpeedConfigResult& result) {
  if (!fp16.is_object()) r.fail("fp16", "must be an object such as {\"enabled\": true}");
  for (const auto& [name, value] : fp16.items()) {
    const std::string key = "fp16." + name;
    if (name == "enabled") {
      if (!Reader::is_auto(value)) result.fp16 = r.boolean(value, key);
    } else if (name == "loss_scale") {
      options.loss_scale = r.number(value, key, 0);
    } else if (name == "initial_scale_power") {
      options.initial_scale_power = static_cast<int>(r.integer(value, key, 0));
      if (options.initial_scale_power > 64) r.fail(key, "must be at most 64, got " + value.dump());
    } else if (name == "loss_scale_window") {
      options.loss_scale_window = static_cast<int>(r.integer(value, key, 1));
    } else if (name == "hysteresis") {
      options.hysteresis = static_cast<int>(r.integer(value, key, 1));
    } else if (name == "min_loss_scale") {
      options.min_loss_scale = r.number(value, key, 0);
    } else if (name == "auto_cast" || name == "consecutive_hysteresis") {
      if (r.boolean(value, key)) r.fail(key, "= true is not supported (only false)");
    } else {
      r.ignore(key);
    }
  }
}

}  // namespace

DeepSpeedConfigResult apply_deepspeed_config_text(const std::string& text, const std::string& origin,
                                                  int64_t world_size, DeepSpeedOptions& options) {
  DeepSpeedConfigResult result;
  json root;
  try {
    root = json::parse(text);
  } catch (const json::parse_error& e) {
    throw std::invalid_argument("deepspeed config " + origin + " is not valid JSON: " + e.what());
  }
  if (!root.is_object()) {
    throw std::invalid_argument("deepspeed config " + origin + " must be a JSON object ({...}), got " +
                                std::string(root.type_name()));
  }
  Reader r(origin, result);
  int64_t micro = 0, accumulation = 1;
  std::optional<int64_t> batch;
  for (const auto& [name, value] : root.items()) {
    if (name == "zero_optimization") {
      read_zero(r, value, options);
    } else if (name == "gradient_clipping") {
      options.gradient_clipping = r.number(value, name, 0);
    } else if (name == "fp16") {
      read_fp16(r, value, options, result);
    } else if (name == "bf16" || name == "bfloat16") {
      if (!value.is_object()) r.fail(name, "must be an object such as {\"enabled\": true}");
      for (const auto& [key, v] : value.items()) {
        if (key == "enabled") {
          if (!Reader::is_auto(v)) result.bf16 = r.boolean(v, name + ".enabled");
        } else {
          r.ignore(name + "." + key);
        }
      }
    } else if (name == "train_micro_batch_size_per_gpu") {
      if (!Reader::is_auto(value)) micro = r.integer(value, name, 1);
    } else if (name == "gradient_accumulation_steps") {
      if (!Reader::is_auto(value)) accumulation = r.integer(value, name, 1);
      if (accumulation > 1) {
        r.fail(name, "= " + value.dump() + " is not supported: the training loop accumulates. Step "
                     "the optimizer every N batches and wrap the others in fabric.no_backward_sync "
                     "(then set gradient_accumulation_steps to 1 or remove it)");
      }
    } else if (name == "train_batch_size") {
      if (!Reader::is_auto(value)) batch = r.integer(value, name, 1);
    } else if (name == "optimizer" || name == "scheduler") {
      r.fail(name, "is not supported: build the " + std::string(name == "optimizer" ? "optimizer" : "learning-rate scheduler") +
                   " in C++ and pass it to fabric.setup (torchfabric does not build one from the "
                   "config); remove the section");
    } else if (name == "zero_allow_untested_optimizer" || name == "zero_force_ds_cpu_optimizer") {
      r.boolean(value, name);  // every LibTorch optimizer works on the partitions
    } else {
      r.ignore(name);  // steps_per_print, wall_clock_breakdown, logging, tuning
    }
  }
  options.train_micro_batch_size_per_gpu = micro;
  if (batch && micro > 0 && world_size > 0 && *batch != micro * accumulation * world_size) {
    throw std::invalid_argument(
        "deepspeed config " + origin + ": 'train_batch_size' = " + std::to_string(*batch) +
        " is not train_micro_batch_size_per_gpu x gradient_accumulation_steps x world size = " +
        std::to_string(micro) + " x " + std::to_string(accumulation) + " x " + std::to_string(world_size) +
        "; fix one of them or set it to \"auto\"");
  }
  return result;
}

DeepSpeedConfigResult apply_deepspeed_config(const std::string& path, int64_t world_size,
                                             DeepSpeedOptions& options) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw std::invalid_argument("deepspeed config '" + path +
                                "' cannot be read (no such file, or no permission); pass the path "
                                "of a DeepSpeed JSON config (ds_config.json)");
  }
  std::stringstream text;
  text << in.rdbuf();
  return apply_deepspeed_config_text(text.str(), "'" + path + "'", world_size, options);
}

}  // namespace fabric::strategies
