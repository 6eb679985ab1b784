// What the multi-host test files of host_tests share: the programs named on the
// command line (main() is in two_host_test.cpp) and a checkpoint's tensors.
#pragma once

#include <string>
#include <vector>

#include <ATen/core/ivalue.h>
#include <torch/types.h>

namespace hosttest {

// argv: scripts/two_hosts.sh, ddp_worker, fsdp_worker, then (optional) fabric-run,
// the custom_trainer example and scripts/slurm_cluster.sh; absolute paths.
extern std::string g_script, g_ddp_worker, g_fsdp_worker, g_fabric_run, g_custom_trainer,
    g_slurm_cluster;

std::string absolute(const char* path);

// Every tensor in a checkpoint's value, in key order (nested dicts and lists walked).
void collect_tensors(const c10::IValue& value, std::vector<torch::Tensor>& out);

}  // namespace hosttest
