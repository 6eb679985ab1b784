// Loggers and the progress bar: CSVLogger's files against what Lightning's own
// CSVLogger writes for the same calls, TensorBoardLogger's event files read back
// record by record (CRCs checked) with the tensorboard package, what a killed run
// keeps, and the progress bar's line.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>

#include <torch/torch.h>

#include "loggers/csv_logger.h"
#include "fabric/fabric.h"
#include "checkpoint/filesystem.h"
#include "loggers/progress_bar.h"
#include "loggers/tensorboard_logger.h"
#include "test_util.h"

namespace {

std::string fresh_dir(const std::string& name) {
  const auto dir = ::testing::TempDir() + "/" + name;
  fabric::fs::remove_all(dir);
  return dir;
}

// A Python float literal that is exactly `value`.
std::string py_float(double value) {
  if (std::isnan(value)) return "float('nan')";
  if (std::isinf(value)) return value > 0 ? "float('inf')" : "float('-inf')";
  char text[64];
  std::snprintf(text, sizeof(text), "float.fromhex('%a')", value);
  return text;
}

testutil::CommandResult run_python(const std::string& dir, const std::string& script) {
  const auto path = dir + "/check.py";
  std::ofstream(path) << script;
  return testutil::run_command(testutil::python() + " " + path);
}

// The metric rows the CSV tests log: (step, metrics); names appear over time.
const std::vector<std::pair<int64_t, std::map<std::string, double>>>& csv_rows() {
  static const std::vector<std::pair<int64_t, std::map<std::string, double>>> rows{
      {0, {{"loss", 0.25}}},
      {1, {{"loss", 0.1}}},
      {2, {{"loss", 1e-5}, {"acc", 3.0}}},
      {5, {{"val/loss", 1.0 / 3.0}, {"big", 1e16}, {"neg", -0.0}}},
      {6, {{"loss", 123456.789}, {"tiny", 2.5e-300}, {"a,b", 2.0}}},
      {7, {{"loss", std::nan("")}, {"acc", INFINITY}}},
  };
  return rows;
}

}  // namespace

TEST(Logger, PythonFloatMatchesRepr) {
  const std::vector<double> values{0.0, -0.0, 0.1, 1.0 / 3.0, 1e-5, 1.5e-4, 1e-4, 1e16, 1e15,
                                   123456789012.0, 2.5e-300, 1.7976931348623157e308, -42.0, 5e-324};
  std::string script = "import sys\nvalues = [";
  for (double v : values) script += py_float(v) + ", ";
  script += "]\nfor v in values: print(repr(v))\n";
  const auto dir = fresh_dir("python_float");
  fabric::fs::make_directories(dir);
  const auto result = run_python(dir, script);
  ASSERT_EQ(result.status, 0) << result.output;
  std::string expected;
  for (double v : values) expected += fabric::logging::python_float(v) + "\n";
  EXPECT_EQ(result.output, expected);
}

TEST(Logger, CsvFilesMatchLightningCsvLogger) {
  const auto dir = fresh_dir("csv_vs_lightning");
  // Ours, through Fabric (rank zero), into ours/lightning_logs/version_N.
  auto first = std::make_shared<fabric::CSVLogger>(dir + "/ours");
  auto second = std::make_shared<fabric::CSVLogger>(dir + "/ours");
  {
    fabric::Fabric fabric({.accelerator = "cpu", .loggers = {first}});
    fabric.log_hyperparams({{"lr", 0.001}, {"batch_size", int64_t{64}}, {"name", std::string("it's")},
                            {"amsgrad", true}, {"eps", 1e-8}});
    for (const auto& [step, metrics] : csv_rows()) fabric.log_dict(metrics, step);
  }
  // A second logger in the same root takes the next version once it writes.
  second->log_metrics({{"x", 1.0}}, 0);
  EXPECT_EQ(first->version(), 0);
  EXPECT_EQ(second->version(), 1);
  EXPECT_EQ(first->log_dir(), dir + "/ours/lightning_logs/version_0");
  EXPECT_THROW_WITH(first->log_metrics({{"step", 1.0}}, 9), "'step'", "metrics.csv");

  // Lightning's CSVLogger with the same calls.
  std::string script = "import yaml\nfrom lightning.fabric.loggers import CSVLogger\n"
                       "logger = CSVLogger('" + dir + "/lightning')\nrows = [\n";
  for (const auto& [step, metrics] : csv_rows()) {
    script += "  (" + std::to_string(step) + ", {";
    for (const auto& [name, value] : metrics) script += "'" + name + "': " + py_float(value) + ", ";
    script += "}),\n";
  }
  script += "]\nfor step, metrics in rows: logger.log_metrics(metrics, step)\n"
            "logger.finalize('success')\nprint(logger.log_dir)\n"
            "h = yaml.safe_load(open('" + dir + "/ours/lightning_logs/version_0/hparams.yaml'))\n"
            "assert h == {'lr': 0.001, 'batch_size': 64, 'name': \"it's\", 'amsgrad': True, "
            "'eps': 1e-8}, h\nassert [type(h[k]).__name__ for k in sorted(h)] == "
            "['bool', 'int', 'float', 'float', 'str'], h\nprint('hparams ok')\n";
  const auto result = run_python(dir, script);
  ASSERT_EQ(result.status, 0) << result.output;
  EXPECT_NE(result.output.find("lightning/lightning_logs/version_0"), std::string::npos) << result.output;
  EXPECT_NE(result.output.find("hparams ok"), std::string::npos) << result.output;
  const auto ours = testutil::read_file(dir + "/ours/lightning_logs/version_0/metrics.csv");
  const auto theirs = testutil::read_file(dir + "/lightning/lightning_logs/version_0/metrics.csv");
  ASSERT_FALSE(theirs.empty());
  EXPECT_EQ(ours, theirs);
}

TEST(Logger, TensorBoardEventsReadBackStrictly) {
  const auto dir = fresh_dir("tensorboard");
  auto logger = std::make_shared<fabric::TensorBoardLogger>(dir, "exp");
  auto values = torch::randn({1000}, torch::kDouble) * 3 + 1;
  {
    fabric::Fabric fabric({.accelerator = "cpu", .loggers = {logger}});
    fabric.log_hyperparams({{"lr", 0.001}, {"layers", int64_t{4}}, {"opt", std::string("adam")},
                            {"fused", false}});
    fabric.log("loss", 0.5, 1);
    fabric.log_dict({{"loss", 0.25}, {"acc", 0.75}}, 2);
    fabric.log("loss", -1e-3);  // step 3
  }
  logger->log_histogram("weights", values, 3, 20);
  EXPECT_THROW_WITH(logger->log_histogram("bad", torch::tensor({1.0, std::nan("")}), 4), "'bad'", "non-finite");
  EXPECT_THROW_WITH(logger->log_histogram("empty", torch::zeros({0}), 4), "'empty'", "empty");
  logger->finalize();
  EXPECT_EQ(logger->log_dir(), dir + "/exp/version_0");
  EXPECT_NE(logger->path().find("/exp/version_0/events.out.tfevents."), std::string::npos);

  std::string expected_values = "[";
  auto accessor = values.accessor<double, 1>();
  for (int64_t i = 0; i < values.size(0); ++i) expected_values += py_float(accessor[i]) + ",";
  expected_values += "]";
  const std::string script = R"(import glob, struct, numpy as np
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
files = glob.glob(')" + dir + R"(/exp/version_0/events.out.tfevents.*')
assert len(files) == 1, files
data = open(files[0], 'rb').read()
events, pos = [], 0
while pos < len(data):  # strict: every length and CRC checked, nothing left over
    assert pos + 12 <= len(data), 'truncated header'
    (length,) = struct.unpack('<Q', data[pos:pos + 8])
    (crc,) = struct.unpack('<I', data[pos + 8:pos + 12])
    assert crc == masked_crc32c(data[pos:pos + 8]), 'bad length crc'
    body = data[pos + 12:pos + 12 + length]
    (crc,) = struct.unpack('<I', data[pos + 12 + length:pos + 16 + length])
    assert crc == masked_crc32c(body), 'bad data crc'
    event = event_pb2.Event(); event.ParseFromString(body); events.append(event)
    pos += 16 + length
print('records', len(events))
assert events[0].file_version == 'brain.Event:2'
scalars = [(v.tag, e.step, v.simple_value) for e in events[1:] for v in e.summary.value if v.HasField('simple_value')]
print('scalars', scalars)
expect = [('hp_metric', 0, -1.0), ('loss', 1, 0.5), ('acc', 2, 0.75), ('loss', 2, 0.25), ('loss', 3, np.float32(-1e-3))]
assert scalars == expect, (scalars, expect)
plugin = {}
for e in events:
    for v in e.summary.value:
        if v.metadata.plugin_data.plugin_name == 'hparams':
            d = plugin_data_pb2.HParamsPluginData(); d.ParseFromString(v.metadata.plugin_data.content)
            plugin[v.tag] = d
ssi = plugin['_hparams_/session_start_info'].session_start_info.hparams
assert ssi['lr'].number_value == 0.001 and ssi['layers'].number_value == 4, ssi
assert ssi['opt'].string_value == 'adam' and ssi['fused'].HasField('bool_value') and not ssi['fused'].bool_value, ssi
exp = plugin['_hparams_/experiment'].experiment
assert sorted((h.name, h.type) for h in exp.hparam_infos) == [('fused', 2), ('layers', 3), ('lr', 3), ('opt', 1)], exp
assert [m.name.tag for m in exp.metric_infos] == ['hp_metric'], exp
assert plugin['_hparams_/session_end_info'].session_end_info.status == 1
histos = [(v.tag, e.step, v.histo) for e in events for v in e.summary.value if v.HasField('histo')]
assert len(histos) == 1 and histos[0][:2] == ('weights', 3), histos
h = histos[0][2]
x = np.array()" + expected_values + R"()
counts, edges = np.histogram(x, bins=20)
assert list(h.bucket) == list(counts.astype(float)), (list(h.bucket), counts)
assert list(h.bucket_limit) == list(edges[1:]), (list(h.bucket_limit), edges)
assert (h.min, h.max, h.num) == (x.min(), x.max(), 1000.0)
assert abs(h.sum - x.sum()) < 1e-9 and abs(h.sum_squares - (x * x).sum()) < 1e-6
acc = EventAccumulator(files[0]); acc.Reload()
assert [s.value for s in acc.Scalars('loss')] == [0.5, 0.25, np.float32(-1e-3)]
print('tensorboard ok')
)";
  const auto result = run_python(dir, script);
  ASSERT_EQ(result.status, 0) << result.output;
  EXPECT_NE(result.output.find("records 10"), std::string::npos) << result.output;
  EXPECT_NE(result.output.find("tensorboard ok"), std::string::npos) << result.output;
}

TEST(Logger, AKilledRunKeepsWhatItLogged) {
  const auto dir = fresh_dir("killed_logs");
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    // One version for both (each would otherwise take the next free one).
    fabric::CSVLogger csv(dir, "lightning_logs", 0);
    fabric::TensorBoardLogger tensorboard(dir, "lightning_logs", 0);
    for (int step = 0; step < 3; ++step) {
      csv.log_metrics({{"loss", 1.0 / (step + 1)}}, step);
      tensorboard.log_metrics({{"loss", 1.0 / (step + 1)}}, step);
    }
    ::kill(::getpid(), SIGKILL);  // no destructor, no finalize
    ::_exit(0);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
  EXPECT_EQ(testutil::read_file(dir + "/lightning_logs/version_0/metrics.csv"),
            "loss,step\r\n1.0,0\r\n0.5,1\r\n0.3333333333333333,2\r\n");
  const auto result = run_python(dir, R"(import glob
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(glob.glob(')" + dir + R"(/lightning_logs/version_0/events.out.tfevents.*')[0]); acc.Reload()
print('steps', [s.step for s in acc.Scalars('loss')])
)");
  ASSERT_EQ(result.status, 0) << result.output;
  EXPECT_NE(result.output.find("steps [0, 1, 2]"), std::string::npos) << result.output;
}

TEST(Logger, LoggersWithoutHyperParametersSayTheyDropThem) {
  struct Plain : fabric::Logger {
    void log_metrics(const std::map<std::string, double>&, int64_t) override {}
    std::string name() const override { return "Plain"; }
  };
  fabric::Fabric fabric({.accelerator = "cpu", .loggers = {std::make_shared<Plain>()}});
  EXPECT_THROW_WITH(fabric.log_hyperparams({{"lr", 0.1}}), "Plain", "hyper-parameters", "CSVLogger");
}

TEST(ProgressBar, DrawsOneLineOnlyWhenAsked) {
  EXPECT_THROW_WITH(fabric::parse_progress_mode("sometimes"), "auto, on or off", "'sometimes'");
  EXPECT_EQ(fabric::parse_progress_mode("on"), fabric::ProgressMode::kOn);
  auto draw = [](fabric::ProgressMode mode, bool rank_zero) {
    ::testing::internal::CaptureStderr();
    {
      fabric::ProgressBar bar({.mode = mode, .total = 10, .refresh_seconds = 0}, rank_zero);
      for (int64_t step = 1; step <= 10; ++step) bar.update(step, {{"loss", 0.5}}, "epoch 0");
    }
    return ::testing::internal::GetCapturedStderr();
  };
  const auto on = draw(fabric::ProgressMode::kOn, true);
  EXPECT_EQ(std::count(on.begin(), on.end(), '\r'), 10) << on;
  EXPECT_NE(on.find("epoch 0  10/10 [########################] 100%"), std::string::npos) << on;
  EXPECT_NE(on.find("steps/s  ETA 00:00  loss=0.5"), std::string::npos) << on;
  EXPECT_NE(on.find("epoch 0  5/10 [############............]  50%"), std::string::npos) << on;
  EXPECT_EQ(on.back(), '\n');
  // auto: stderr is captured into a file here, not a terminal.
  EXPECT_EQ(draw(fabric::ProgressMode::kAuto, true), "");
  EXPECT_EQ(draw(fabric::ProgressMode::kOff, true), "");
  EXPECT_EQ(draw(fabric::ProgressMode::kOn, false), "");
}
