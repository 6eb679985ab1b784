// strategy="deepspeed" without ranks: the names, DeepSpeed's JSON config (what
// it sets, and the errors that name the key and the fix), the precision check
// and the loss-scaling options it hands the GradScaler. The training itself is
// tested at 2 ranks in deepspeed_test.cpp.
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>

#include "fabric/fabric.h"
#include "precision/grad_scaler.h"
#include "precision/mixed_precision.h"
#include "strategies/deepspeed/config.h"
#include "strategies/deepspeed/deepspeed.h"
#include "strategies/registry.h"
#include "test_util.h"

namespace {

using fabric::strategies::DeepSpeedOptions;

fabric::strategies::StrategyArgs cpu_args() {
  fabric::strategies::StrategyArgs args;
  args.topology.parallel_devices = {c10::Device(c10::kCPU)};
  return args;
}

std::string config_file(const std::string& name, const std::string& json) {
  const std::string path = ::testing::TempDir() + "/ds_config_" + name + ".json";
  std::ofstream(path) << json;
  return path;
}

DeepSpeedOptions apply(const std::string& json) {
  DeepSpeedOptions options;
  fabric::strategies::apply_deepspeed_config_text(json, "test", 2, options);
  return options;
}

}  // namespace

TEST(DeepSpeedConfig, LightningsNamesAreRegisteredAndNvmeIsRefused) {
  const auto valid = fabric::strategies::valid_strategies();
  for (const char* name : {"deepspeed", "deepspeed_stage_1", "deepspeed_stage_1_offload", "deepspeed_stage_2",
                           "deepspeed_stage_2_offload", "deepspeed_stage_3", "deepspeed_stage_3_offload"}) {
    EXPECT_NE(std::find(valid.begin(), valid.end(), name), valid.end()) << name;
  }
  auto args = cpu_args();
  auto stage1 = fabric::strategies::make_strategy("deepspeed_stage_1_offload", args);
  auto* zero = dynamic_cast<fabric::strategies::ZeRODataParallel*>(stage1.get());
  ASSERT_NE(zero, nullptr);
  EXPECT_EQ(zero->stage(), 1);
  EXPECT_TRUE(zero->options().offload_optimizer);
  EXPECT_EQ(stage1->name(), "deepspeed_stage_1_offload");
  auto plain = fabric::strategies::make_strategy("deepspeed", args);
  ASSERT_NE(dynamic_cast<fabric::strategies::ZeRODataParallel*>(plain.get()), nullptr);
  EXPECT_EQ(dynamic_cast<fabric::strategies::ZeRODataParallel*>(plain.get())->stage(), 2);
  auto stage3 = fabric::strategies::make_strategy("deepspeed_stage_3", args);
  ASSERT_NE(dynamic_cast<fabric::strategies::DeepSpeedStage3*>(stage3.get()), nullptr);
  EXPECT_EQ(stage3->name(), "deepspeed_stage_3");
  EXPECT_THROW_WITH(fabric::strategies::make_strategy("deepspeed_stage_3_offload_nvme", args),
                    "not supported", "NVMe", "'deepspeed_stage_3_offload'");
  args.deepspeed.state_dict_type = "sharded";
  EXPECT_TRUE(fabric::strategies::make_strategy("deepspeed_stage_1", args)->sharded_checkpoints());
  EXPECT_NE(dynamic_cast<fabric::strategies::FSDPStrategy*>(fabric::strategies::make_strategy("deepspeed_stage_3", args).get())
                ->sharded_checkpoints(),
            false);
  args.deepspeed.state_dict_type = "dcp";
  EXPECT_THROW_WITH(fabric::strategies::make_strategy("deepspeed_stage_3", args), "state_dict_type='dcp'", "'full'");
  args.deepspeed.state_dict_type = "full";
  auto offload3 = fabric::strategies::make_strategy("deepspeed_stage_3_offload", args);
  auto* s3 = dynamic_cast<fabric::strategies::DeepSpeedStage3*>(offload3.get());
  ASSERT_NE(s3, nullptr);
  EXPECT_TRUE(s3->deepspeed_options().offload_optimizer);
  EXPECT_FALSE(s3->deepspeed_options().offload_parameters);
  // Parameter pieces in host memory: where the device is the CPU they are already.
  args.deepspeed.offload_parameters = true;
  EXPECT_NO_THROW(fabric::strategies::make_strategy("deepspeed_stage_3", args));
  args.deepspeed.offload_parameters = false;
}

TEST(DeepSpeedConfig, TheFileSetsStageOffloadBucketsClippingAndLossScaling) {
  const auto o = apply(R"({
    "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_batch_size": 8,
    "gradient_clipping": 1.5,
    "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu", "pin_memory": true},
                          "reduce_bucket_size": 5e7, "allgather_bucket_size": 1000,
                          "overlap_comm": false, "contiguous_gradients": true},
    "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 12, "loss_scale_window": 50,
             "hysteresis": 3, "min_loss_scale": 0.5}})");
  EXPECT_EQ(o.stage, 1);
  EXPECT_TRUE(o.offload_optimizer);
  EXPECT_EQ(o.reduce_bucket_size, 50000000);
  EXPECT_EQ(o.allgather_bucket_size, 1000);
  EXPECT_FALSE(o.overlap_comm);
  EXPECT_EQ(o.gradient_clipping, 1.5);
  EXPECT_EQ(o.train_micro_batch_size_per_gpu, 4);
  EXPECT_EQ(o.initial_scale_power, 12);
  EXPECT_EQ(o.loss_scale_window, 50);
  EXPECT_EQ(o.hysteresis, 3);
  EXPECT_EQ(o.min_loss_scale, 0.5);

  // "deepspeed" takes its stage from the file (also through PL_DEEPSPEED_CONFIG_PATH).
  auto args = cpu_args();
  args.deepspeed.config = config_file("stage3", R"({"zero_optimization": {"stage": 3}})");
  EXPECT_NE(dynamic_cast<fabric::strategies::DeepSpeedStage3*>(
                fabric::strategies::make_strategy("deepspeed", args).get()),
            nullptr);
  args.deepspeed.config = "";
  ::setenv("PL_DEEPSPEED_CONFIG_PATH", config_file("env", R"({"zero_optimization": {"stage": 1}})").c_str(), 1);
  auto from_env = fabric::strategies::make_strategy("deepspeed", args);
  ::unsetenv("PL_DEEPSPEED_CONFIG_PATH");
  ASSERT_NE(dynamic_cast<fabric::strategies::ZeRODataParallel*>(from_env.get()), nullptr);
  EXPECT_EQ(dynamic_cast<fabric::strategies::ZeRODataParallel*>(from_env.get())->stage(), 1);
  // A stage name the file contradicts.
  args.deepspeed.config = config_file("stage3b", R"({"zero_optimization": {"stage": 3}})");
  EXPECT_THROW_WITH(fabric::strategies::make_strategy("deepspeed_stage_2", args), "'deepspeed_stage_2' is ZeRO stage 2",
                    "zero_optimization.stage = 3", "strategy='deepspeed'");
}

TEST(DeepSpeedConfig, ErrorsNameTheKeyAndWhatToDo) {
  EXPECT_THROW_WITH(apply("{\"zero_optimization\": {\"stage\": 2,}"), "not valid JSON", "test");
  EXPECT_THROW_WITH(apply("[1, 2]"), "must be a JSON object");
  EXPECT_THROW_WITH(apply(R"({"zero_optimization": {"stage": "two"}})"), "'zero_optimization.stage'", "integer",
                    "\"two\"");
  EXPECT_THROW_WITH(apply(R"({"zero_optimization": {"stage": 0}})"), "plain data parallelism", "ddp");
  EXPECT_THROW_WITH(apply(R"({"zero_optimization": {"stage": 4}})"), "Valid values: 1, 2, 3");
  EXPECT_THROW_WITH(apply(R"({"zero_optimization": {"offload_optimizer": {"device": "nvme"}}})"),
                    "'zero_optimization.offload_optimizer.device'", "nvme", "\"cpu\"");
  EXPECT_THROW_WITH(apply(R"({"zero_optimization": {"offload_param": {"device": "gpu"}}})"),
                    "offload_param.device", "Valid values: \"cpu\", \"none\"");
  EXPECT_THROW_WITH(apply(R"({"optimizer": {"type": "AdamW", "params": {"lr": 0.001}}})"), "'optimizer'",
                    "fabric.setup");
  EXPECT_THROW_WITH(apply(R"({"scheduler": {"type": "WarmupLR"}})"), "'scheduler'", "learning-rate scheduler");
  EXPECT_THROW_WITH(apply(R"({"gradient_accumulation_steps": 4})"), "'gradient_accumulation_steps'",
                    "no_backward_sync");
  EXPECT_THROW_WITH(apply(R"({"train_micro_batch_size_per_gpu": 4, "train_batch_size": 32})"),
                    "'train_batch_size' = 32", "4 x 1 x 2");
  EXPECT_THROW_WITH(apply(R"({"gradient_clipping": -1})"), "'gradient_clipping'", ">= 0");
  EXPECT_THROW_WITH(apply(R"({"fp16": {"enabled": true, "hysteresis": 0}})"), "'fp16.hysteresis'", ">= 1");
  EXPECT_THROW_WITH(apply(R"({"zero_optimization": {"overlap_comm": "yes"}})"), "'zero_optimization.overlap_comm'",
                    "true or false");
  DeepSpeedOptions options;
  EXPECT_THROW_WITH(fabric::strategies::apply_deepspeed_config("/nonexistent/ds_config.json", 1, options),
                    "'/nonexistent/ds_config.json' cannot be read");
}

TEST(DeepSpeedConfig, KeysWithoutEffectAreListedInOneWarning) {
  auto args = cpu_args();
  args.deepspeed.config = config_file("unknown", R"({"steps_per_print": 10, "wall_clock_breakdown": false,
      "zero_optimization": {"stage": 2, "sub_group_size": 1e9}})");
  auto strategy = fabric::strategies::make_strategy("deepspeed", args);
  auto* zero = dynamic_cast<fabric::strategies::ZeRODataParallel*>(strategy.get());
  ASSERT_NE(zero, nullptr);
  // (Printed by rank 0 when the ranks start: setup_environment.)
  testing::internal::CaptureStderr();
  fabric::strategies::warn_about_config(zero->from_config(), 0);
  const std::string err = testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("warning"), std::string::npos) << err;
  EXPECT_NE(err.find("'steps_per_print', 'wall_clock_breakdown', 'zero_optimization.sub_group_size'"),
            std::string::npos)
      << err;
}

TEST(DeepSpeedConfig, ThePrecisionMustAgreeWithTheFileAndLossScalingReachesTheScaler) {
  const auto bf16 = config_file("bf16", R"({"bf16": {"enabled": true}})");
  EXPECT_THROW_WITH(fabric::Fabric({.accelerator = "cpu", .strategy = "deepspeed", .devices = 1,
                                    .deepspeed = {.config = bf16}}),
                    "bf16.enabled = true", "'32-true'", "'bf16-mixed' or 'bf16-true'");
  EXPECT_NO_THROW(fabric::Fabric({.accelerator = "cpu", .strategy = "deepspeed", .devices = 1,
                                  .precision = "bf16-mixed", .deepspeed = {.config = bf16}}));
  const auto fp16 = config_file("fp16", R"({"fp16": {"enabled": true, "initial_scale_power": 8,
      "loss_scale_window": 5, "hysteresis": 4, "min_loss_scale": 2}})");
  for (const char* name : {"deepspeed", "deepspeed_stage_3"}) {
    SCOPED_TRACE(name);
    auto args = cpu_args();
    args.deepspeed.config = fp16;
    auto strategy = fabric::strategies::make_strategy(name, args);
    auto plugin = std::make_shared<fabric::precision::MixedPrecision>(
        torch::kHalf, c10::kCPU, std::make_unique<fabric::precision::GradScaler>());
    strategy->set_precision(plugin);
    const auto& o = plugin->scaler()->options();
    EXPECT_EQ(o.init_scale, 256.0);
    EXPECT_EQ(o.growth_interval, 5);
    EXPECT_EQ(o.hysteresis, 4);
    EXPECT_EQ(o.min_scale, 2.0);
    EXPECT_TRUE(plugin->scaler()->has_found_inf_reducer());
    EXPECT_THROW_WITH(strategy->set_precision(std::make_shared<fabric::precision::MixedPrecision>(
                          torch::kBFloat16, c10::kCPU)),
                      "fp16.enabled = true", "'16-mixed' or '16-true'");
  }
}
