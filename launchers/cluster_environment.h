// Detects whether an external launcher started this process and which rank it is.
// Checked in this order, first match wins:
//   1. torchrun-style: RANK and WORLD_SIZE (plus LOCAL_RANK, NODE_RANK or GROUP_RANK)
//   2. Open MPI:       OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK
//   3. SLURM:          a task of an srun step (SLURM_PROCID with SLURM_STEP_ID; the
//                      batch script itself is not a task): SLURM_PROCID, the step's
//                      SLURM_STEP_NUM_TASKS, SLURM_LOCALID, SLURM_NODEID and
//                      SLURM_STEP_TASKS_PER_NODE (uneven placement is an error), the
//                      general SLURM_NTASKS/SLURM_TASKS_PER_NODE when the step ones
//                      are missing; ignored in an interactive `srun bash` session.
//                      The main address is the first host of SLURM_STEP_NODELIST and
//                      the port 15000 + the last four digits of SLURM_JOB_ID
//                      (Lightning's choice). Under `srun --mpi=pmix` (PMIX_RANK set)
//                      the ranks can form an MPI world, as under mpirun.
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
  int64_t num_nodes = 1;         // nodes the launcher spread the world over
  bool pmix = false;             // slurm: started by a PMIx launcher (srun --mpi=pmix)
};

// Reads the variables above; throws std::invalid_argument naming a variable whose
// value is not a number or is out of range (e.g. RANK >= WORLD_SIZE).
ClusterEnvironment detect_cluster_environment();

}  // namespace fabric::launchers
