// What the multi-host test files of host_tests share: the programs named on the
// command line (main() is in two_host_test.cpp), the comparison of what the
// workers wrote, and a checkpoint's tensors.
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

// The parameters each worker rank wrote (DIR/params_rank<r>.pt) are the same in
// both folders, to 1e-5 relative and 1e-6 absolute.
void expect_same_params(const std::string& one_host, const std::string& two_hosts, int ranks);

// Ranks 0..per_host-1 wrote hostA to DIR/host_<rank>, the others hostB.
void expect_placement(const std::string& dir, int per_host);

// Every tensor in a checkpoint's value, in key order (nested dicts and lists walked).
void collect_tensors(const c10::IValue& value, std::vector<torch::Tensor>& out);

}  // namespace hosttest
