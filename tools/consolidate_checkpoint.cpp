// consolidate_checkpoint SHARDED_DIR OUT_FILE
// Turns a sharded checkpoint (fabric.save under fsdp with
// state_dict_type="sharded", or a torch.distributed.checkpoint directory Python
// wrote) into one full checkpoint file: the file a "full" save would have
// written, which every strategy, and Python's torch.load, reads.
#include <exception>
#include <iostream>
#include <string>

#include "checkpoint/sharded_checkpoint.h"

int main(int argc, char** argv) {
  if (argc != 3 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    std::cerr << "usage: consolidate_checkpoint SHARDED_DIR OUT_FILE\n"
                 "  writes the sharded checkpoint directory SHARDED_DIR (from fsdp with\n"
                 "  state_dict_type=\"sharded\", or Python's torch.distributed.checkpoint)\n"
                 "  as one full checkpoint file OUT_FILE"
              << std::endl;
    return argc == 2 ? 0 : 2;
  }
  try {
    if (!fabric::is_sharded_checkpoint(argv[1])) {
      std::cerr << "error: " << argv[1] << " is not a sharded checkpoint (no .metadata in it)"
                << std::endl;
      return 1;
    }
    fabric::consolidate_checkpoint(argv[1], argv[2]);
    std::cout << "wrote " << argv[2] << std::endl;
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << std::endl;
    return 1;
  }
}
