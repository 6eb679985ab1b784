// Detects whether an external launcher started this process and which rank it is.
// Checked in this order, first match wins:
//   1. torchrun-style: RANK and WORLD_SIZE (plus LOCAL_RANK, NODE_RANK or GROUP_RANK)
//   2. Open MPI:       OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK
//   3. SLURM:          SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID
//                      (ignored in an interactive `srun bash` session); the main
//                      address is the first host of SLURM_NODELIST and the port
//                      15000 + the last four digits of SLURM_JOB_ID
// Nothing set means a plain process: rank 0 of a world of one.
// The main address and port for the rendezvous come from MASTER_ADDR/MASTER_PORT
// when set (all three kinds); under mpirun without them, rank 0 broadcasts its own.
#pragma once

#include <cstdint>
#include <string>

namespace fabric::launchers {

struct ClusterEnvironment {
  std::string kind = "none";  // "none", "torchrun", "mpi", "slurm"
  int64_t global_rank = 0;
  int64_t world_size = 1;
  int64_t local_rank = 0;
  int64_t node_rank = 0;
  int64_t local_world_size = 1;  // ranks on this node
  std::string main_address;      // empty: not known from the environment
  int main_port = 0;             // 0: not known from the environment
};

// Reads the variables above; throws std::invalid_argument naming a variable whose
// value is not a number or is out of range (e.g. RANK >= WORLD_SIZE).
ClusterEnvironment detect_cluster_environment();

}  // namespace fabric::launchers
