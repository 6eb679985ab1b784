// Auto-wrap policies for strategy="fsdp": which children of a
// torch::nn::Sequential (anywhere in the model) become sharding units at setup,
// without changing the model's code. Only Sequential children can be wrapped
// this way, because a Sequential calls its children through a table the strategy
// can rewrite; elsewhere, mark blocks with fabric::Sharded (fabric/sharded.h).
// A wrapped child keeps its parameter names; its forward must take and return
// one tensor (what a Sequential passes along).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "strategies/options.h"

namespace torch::nn {
class Module;
}

namespace fabric::strategies {

// Every child of every Sequential.
AutoWrapPolicy wrap_sequential_children();
// Children whose module type name (Module::name(), e.g. "torch::nn::Linear" or
// "Block"; matched on the last `::` component, with or without "Impl") is listed.
AutoWrapPolicy wrap_module_types(std::vector<std::string> type_names);
// Children holding at least min_num_params parameter elements.
AutoWrapPolicy wrap_min_num_params(int64_t min_num_params);

// Applies `policy` to `root` in place; returns the adapters it installed (each a
// unit). Children already wrapped are left alone.
std::vector<std::shared_ptr<torch::nn::Module>> apply_auto_wrap(torch::nn::Module& root,
                                                                const AutoWrapPolicy& policy);

}  // namespace fabric::strategies
