// The codecs of LibTorch's optimizers, with the key names of Python's
// torch.optim (PyTorch 2.11) for the same optimizer.
#include <torch/optim/adagrad.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/rmsprop.h>
#include <torch/optim/sgd.h>

#include "optim/codec.h"

namespace fabric::optim {
namespace {

using torch::optim::OptimizerOptions;
using torch::optim::OptimizerParamState;

// Does the casts once: derived codecs see their own option and state types.
template <typename Options, typename State>
class TypedCodec : public OptimizerCodec {
 public:
  bool handles(const OptimizerOptions& options) const final {
    return dynamic_cast<const Options*>(&options) != nullptr;
  }
  void save_group(const OptimizerOptions& options, GenericDict& out) const final {
    save(static_cast<const Options&>(options), out);
  }
  void load_group(const GroupEntry& in, OptimizerOptions& options) const final {
    load(in, static_cast<Options&>(options));
  }
  void save_state(const OptimizerParamState& state, GenericDict& out) const final {
    save(as_state(state), out);
  }
  std::unique_ptr<OptimizerParamState> load_state(const StateEntry& in) const final {
    auto state = std::make_unique<State>();
    load(in, *state);
    return state;
  }
  std::vector<at::Tensor*> per_element_state(OptimizerParamState& state) const final {
    return slots(const_cast<State&>(as_state(state)));
  }

 protected:
  virtual void save(const Options& o, GenericDict& out) const = 0;
  virtual void load(const GroupEntry& in, Options& o) const = 0;
  virtual void save(const State& s, GenericDict& out) const = 0;
  virtual void load(const StateEntry& in, State& s) const = 0;
  virtual std::vector<at::Tensor*> slots(State& s) const = 0;

 private:
  const State& as_state(const OptimizerParamState& state) const {
    const auto* typed = dynamic_cast<const State*>(&state);
    if (!typed) {
      throw std::invalid_argument(name() + ": a parameter's state is not of the type its " +
                                  "options belong to");
    }
    return *typed;
  }
};

void put_if_defined(GenericDict& out, const char* key, const at::Tensor& t) {
  if (t.defined()) out.insert(key, t);
}

// Adam and AdamW share option and state fields but no base class.
template <typename Options, typename State, bool Decoupled>
class AdamFamilyCodec final : public TypedCodec<Options, State> {
 public:
  std::string name() const override { return Decoupled ? "AdamW" : "Adam"; }

 protected:
  void save(const Options& o, GenericDict& out) const override {
    out.insert("lr", o.lr());
    out.insert("betas", c10::ivalue::Tuple::create(std::get<0>(o.betas()), std::get<1>(o.betas())));
    out.insert("eps", o.eps());
    out.insert("weight_decay", o.weight_decay());
    out.insert("amsgrad", o.amsgrad());
    out.insert("decoupled_weight_decay", Decoupled);
  }
  void load(const GroupEntry& in, Options& o) const override {
    const auto [beta1, beta2] = in.pair("betas");
    o.lr(in.number("lr")).eps(in.number("eps")).weight_decay(in.number("weight_decay"))
        .amsgrad(in.flag("amsgrad")).betas(std::make_tuple(beta1, beta2));
  }
  void save(const State& s, GenericDict& out) const override {
    out.insert("step", step_tensor(s.step()));
    out.insert("exp_avg", s.exp_avg());
    out.insert("exp_avg_sq", s.exp_avg_sq());
    put_if_defined(out, "max_exp_avg_sq", s.max_exp_avg_sq());
  }
  void load(const StateEntry& in, State& s) const override {
    s.step(in.step()).exp_avg(in.tensor("exp_avg")).exp_avg_sq(in.tensor("exp_avg_sq"));
    if (auto m = in.tensor("max_exp_avg_sq"); m.defined()) s.max_exp_avg_sq(m);
  }
  std::vector<at::Tensor*> slots(State& s) const override {
    return {&s.exp_avg(), &s.exp_avg_sq(), &s.max_exp_avg_sq()};
  }
};

class SGDCodec final : public TypedCodec<torch::optim::SGDOptions, torch::optim::SGDParamState> {
 public:
  std::string name() const override { return "SGD"; }

 protected:
  void save(const torch::optim::SGDOptions& o, GenericDict& out) const override {
    out.insert("lr", o.lr());
    out.insert("momentum", o.momentum());
    out.insert("dampening", o.dampening());
    out.insert("weight_decay", o.weight_decay());
    out.insert("nesterov", o.nesterov());
  }
  void load(const GroupEntry& in, torch::optim::SGDOptions& o) const override {
    o.lr(in.number("lr")).momentum(in.number("momentum")).dampening(in.number("dampening"))
        .weight_decay(in.number("weight_decay")).nesterov(in.flag("nesterov"));
  }
  void save(const torch::optim::SGDParamState& s, GenericDict& out) const override {
    put_if_defined(out, "momentum_buffer", s.momentum_buffer());
  }
  void load(const StateEntry& in, torch::optim::SGDParamState& s) const override {
    if (auto m = in.tensor("momentum_buffer"); m.defined()) s.momentum_buffer(m);
  }
  std::vector<at::Tensor*> slots(torch::optim::SGDParamState& s) const override {
    return {&s.momentum_buffer()};
  }
};

class RMSpropCodec final
    : public TypedCodec<torch::optim::RMSpropOptions, torch::optim::RMSpropParamState> {
 public:
  std::string name() const override { return "RMSprop"; }

 protected:
  void save(const torch::optim::RMSpropOptions& o, GenericDict& out) const override {
    out.insert("lr", o.lr());
    out.insert("alpha", o.alpha());
    out.insert("eps", o.eps());
    out.insert("weight_decay", o.weight_decay());
    out.insert("momentum", o.momentum());
    out.insert("centered", o.centered());
  }
  void load(const GroupEntry& in, torch::optim::RMSpropOptions& o) const override {
    o.lr(in.number("lr")).alpha(in.number("alpha")).eps(in.number("eps"))
        .weight_decay(in.number("weight_decay")).momentum(in.number("momentum"))
        .centered(in.flag("centered"));
  }
  void save(const torch::optim::RMSpropParamState& s, GenericDict& out) const override {
    out.insert("step", step_tensor(s.step()));
    out.insert("square_avg", s.square_avg());
    put_if_defined(out, "momentum_buffer", s.momentum_buffer());
    put_if_defined(out, "grad_avg", s.grad_avg());
  }
  void load(const StateEntry& in, torch::optim::RMSpropParamState& s) const override {
    s.step(in.step()).square_avg(in.tensor("square_avg"));
    if (auto m = in.tensor("momentum_buffer"); m.defined()) s.momentum_buffer(m);
    if (auto m = in.tensor("grad_avg"); m.defined()) s.grad_avg(m);
  }
  std::vector<at::Tensor*> slots(torch::optim::RMSpropParamState& s) const override {
    return {&s.square_avg(), &s.momentum_buffer(), &s.grad_avg()};
  }
};

class AdagradCodec final
    : public TypedCodec<torch::optim::AdagradOptions, torch::optim::AdagradParamState> {
 public:
  std::string name() const override { return "Adagrad"; }

 protected:
  void save(const torch::optim::AdagradOptions& o, GenericDict& out) const override {
    out.insert("lr", o.lr());
    out.insert("lr_decay", o.lr_decay());
    out.insert("weight_decay", o.weight_decay());
    out.insert("initial_accumulator_value", o.initial_accumulator_value());
    out.insert("eps", o.eps());
  }
  void load(const GroupEntry& in, torch::optim::AdagradOptions& o) const override {
    o.lr(in.number("lr")).lr_decay(in.number("lr_decay")).weight_decay(in.number("weight_decay"))
        .initial_accumulator_value(in.number("initial_accumulator_value")).eps(in.number("eps"));
  }
  void save(const torch::optim::AdagradParamState& s, GenericDict& out) const override {
    out.insert("step", step_tensor(s.step()));
    out.insert("sum", s.sum());
  }
  void load(const StateEntry& in, torch::optim::AdagradParamState& s) const override {
    s.step(in.step()).sum(in.tensor("sum"));
  }
  std::vector<at::Tensor*> slots(torch::optim::AdagradParamState& s) const override {
    return {&s.sum()};
  }
};

}  // namespace

std::vector<std::shared_ptr<const OptimizerCodec>> builtin_codecs() {
  using namespace torch::optim;
  return {std::make_shared<SGDCodec>(),
          std::make_shared<AdamFamilyCodec<AdamOptions, AdamParamState, false>>(),
          std::make_shared<AdamFamilyCodec<AdamWOptions, AdamWParamState, true>>(),
          std::make_shared<RMSpropCodec>(), std::make_shared<AdagradCodec>()};
}

}  // namespace fabric::optim
