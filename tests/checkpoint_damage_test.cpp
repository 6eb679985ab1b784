// Checkpoints that are not what they claim: self-containing and deeply nested
// pickles, the fuzzer's findings, truncated and corrupted files, forged sizes:
// each ends in an error naming the file, without a crash or a huge allocation.
#include "checkpoint_test_util.h"

using namespace checkpoint_test;

// A list that contains itself (9 bytes of pickle), 100 000-deep nesting, 3 000
// levels hidden behind shared chains (each 999 deep) and shared lists that expand to
// 2^60 values (found by make fuzz and in review): errors naming the file, not a
// stack overflow or a hang. 900 levels, which Python
// writes itself, still read.
TEST(Checkpoint, SelfContainingAndDeeplyNestedPicklesEndInAnError) {
  const std::string d = dir() + "/nesting";
  fabric::fs::make_directories(d);
  run_python("nesting", R"(import sys, torch, zipfile
d = ')" + d + R"('
l = []
l.append(l)
torch.save(l, d + '/self.pt')
t = []
t.append((t,))
torch.save({'x': t}, d + '/self_tuple.pt')
deep = []
for _ in range(900):
    deep = [deep]
sys.setrecursionlimit(10000)
torch.save({'deep': deep}, d + '/deep900.pt')
def replace_pickle(src, dst, pkl):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, 'w', zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info, pkl if info.filename.endswith('/data.pkl') else zin.read(info))
n = 100000
replace_pickle(d + '/self.pt', d + '/deep_lists.pt', b'\x80\x02' + b']' * n + b'a' * (n - 1) + b'.')
replace_pickle(d + '/self.pt', d + '/deep_tuples.pt', b'\x80\x02' + b')' + b'\x85' * n + b'.')
replace_pickle(d + '/self.pt', d + '/deep_dict_key.pt', b'\x80\x02}' + b')' + b'\x85' * n + b'K\x01s.')
# 60 lists, each holding the previous one twice (through the memo): 2^60 as a tree
dag = b'\x80\x02]q\x00'
for i in range(1, 61):
    dag += b'](h' + bytes([i - 1]) + b'h' + bytes([i - 1]) + b'eq' + bytes([i])
replace_pickle(d + '/self.pt', d + '/dag60.pt', dag + b'.')
# 3 chains of 999 lists, linked top-down (so no depth is known while they are
# built), the innermost list of each holding the previous chain: each chain
# alone is 999 deep, together about 3 000
import struct
def pack(i): return struct.pack('<I', i)
out, idx, heads = b'\x80\x02', 0, []
for j in range(3):
    first = idx
    for i in range(999):
        out += b']r' + pack(idx) + b'0'
        idx += 1
    for i in range(998):
        out += b'j' + pack(first + i) + b'j' + pack(first + i + 1) + b'a0'
    if heads:
        out += b'j' + pack(first + 998) + b'j' + pack(heads[-1]) + b'a0'
    heads.append(first)
out += b'(' + b''.join(b'j' + pack(h) for h in heads) + b'l.'
replace_pickle(d + '/self.pt', d + '/shared_chains.pt', out)
)");
  for (const std::string name : {"self", "self_tuple"}) {
    const std::string path = d + "/" + name + ".pt";
    EXPECT_THROW_WITH(fabric::read_checkpoint(path), {path, "contains itself"});
  }
  for (const std::string name : {"deep_lists", "deep_tuples", "deep_dict_key", "shared_chains"}) {
    const std::string path = d + "/" + name + ".pt";
    EXPECT_THROW_WITH(fabric::read_checkpoint(path), {path, "nested more than 1000 deep"});
  }
  EXPECT_THROW_WITH(fabric::read_checkpoint(d + "/dag60.pt"), {d + "/dag60.pt", "expand to more than"});
  auto deep = fabric::read_checkpoint(d + "/deep900.pt").toGenericDict().at("deep");
  int levels = 0;
  while (deep.isList() && deep.toListRef().size() == 1) {
    deep = deep.toListRef()[0];
    ++levels;
  }
  EXPECT_EQ(levels, 900);
}

// Every checkpoint input `make fuzz` found crashing or hanging the reader
// (tests/fuzz/crashes/, run from the repository root or Bazel's runfiles) now
// ends in an error naming the file.
TEST(Checkpoint, FuzzFindingsEndInAnErrorNamingTheFile) {
  const std::string folder = "tests/fuzz/crashes";
  std::vector<std::string> files;
  for (const auto& name : fabric::fs::list_directory(folder)) {
    if (name.rfind("checkpoint-", 0) == 0) files.push_back(folder + "/" + name);
  }
  ASSERT_GE(files.size(), 5u) << "the fuzz findings are missing from " << folder
                              << " (run the tests from the repository root)";
  for (const auto& path : files) {
    SCOPED_TRACE(path);
    EXPECT_THROW_WITH(fabric::read_checkpoint(path), {path});
    EXPECT_THROW_WITH(fabric::read_checkpoint(path, fabric::ReadMode::kMapped), {path});
  }
}

// Hundreds of damaged files (truncated anywhere, bytes flipped, the pickle
// overwritten with junk, a zip of something else, a huge claimed length): each
// read either succeeds (a flipped byte inside tensor data is just a value) or
// throws an error naming the path; none crashes or hangs. Both readers are
// exercised: our own file and Python's OrderedDict state dict.
TEST(Checkpoint, DamagedFilesEndInAnErrorNamingThePath) {
  const std::string d = dir() + "/damaged";
  fabric::fs::make_directories(d);
  const std::string ours = d + "/ours.pt";
  auto model = std::make_shared<MlpImpl>();
  fabric::save_checkpoint(ours, {{"model", model}, {"step", 5}, {"name", "run"}});
  const std::string python_file = d + "/python.pt";
  auto python = testutil::run_command(
      testutil::python() + " -c \"import torch, collections; torch.save(collections.OrderedDict("
      "w=torch.ones(3, 4), b=torch.arange(5), n=collections.OrderedDict(x=1.5)), '" + python_file + "')\"");
  ASSERT_EQ(python.status, 0) << python.output;
  std::mt19937 rng(1234);
  int errors = 0, reads = 0;
  for (const auto& source : {ours, python_file}) {
    const auto original = read_bytes(source);
    ASSERT_GT(original.size(), 100u);
    for (int trial = 0; trial < 150; ++trial) {
      auto bytes = original;
      switch (trial % 5) {
        case 0:  // truncated at a random point
          bytes.resize(rng() % bytes.size());
          break;
        case 1:  // a few random bytes flipped
          for (int k = 0; k < 1 + static_cast<int>(rng() % 8); ++k) bytes[rng() % bytes.size()] ^= static_cast<char>(1 + rng() % 255);
          break;
        case 2: {  // a run of junk somewhere
          const size_t at = rng() % bytes.size();
          for (size_t k = at; k < std::min(bytes.size(), at + 64); ++k) bytes[k] = static_cast<char>(rng());
          break;
        }
        case 3: {  // a large length claimed inside the archive
          const size_t at = rng() % (bytes.size() - 4);
          const uint32_t huge = 0x7fffffffu;
          std::memcpy(&bytes[at], &huge, 4);
          break;
        }
        case 4:  // the zip magic followed by junk
          for (size_t k = 2; k < bytes.size(); ++k) bytes[k] = static_cast<char>(rng());
          break;
      }
      const std::string path = d + "/case_" + std::to_string(trial) + ".pt";
      std::ofstream(path, std::ios::binary | std::ios::trunc)
          .write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
      try {
        fabric::read_checkpoint(path);
        ++reads;
      } catch (const std::exception& e) {
        ++errors;
        EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
      }
    }
  }
  EXPECT_GT(errors, 200) << reads << " damaged files read without an error";
}

// Forged sizes (a pickle string claiming 1 TiB or 3.75 GiB, a storage claiming
// 10^12 elements, tensors of 10^12 or 10^6 x 10^6 elements or with sizes and
// strides whose extent overflows, over a 6-element storage, zip records
// claiming 1 TiB or 3 GiB) end in an error naming the path, and reading them
// stays within a small memory bound: each is read in a child process whose
// address space may grow by at most 1 GiB, and whose peak resident memory is
// measured (VmHWM after resetting it through /proc/self/clear_refs).
TEST(Checkpoint, ForgedSizesDoNotAllocateWhatTheyClaim) {
  const std::string d = dir() + "/forged";
  fabric::fs::make_directories(d);
  const auto made = run_python("forge",
      "import io, struct, zipfile, torch\n"
      "d = '" + d + "'\n"
      "def archive(path, pkl, records):\n"
      "    with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as z:\n"
      "        z.writestr('archive/data.pkl', pkl)\n"
      "        z.writestr('archive/byteorder', 'little')\n"
      "        for name, data in records.items(): z.writestr('archive/data/' + name, data)\n"
      "        z.writestr('archive/version', '3\\n')\n"
      "# a dict {'k': <string of the claimed length>}\n"
      "head = b'\\x80\\x02}q\\x00X\\x01\\x00\\x00\\x00k'\n"
      "archive(d + '/unicode8.pt', b'\\x80\\x04}\\x8c\\x01k\\x8d' + struct.pack('<Q', 1 << 40) + b'abc', {})\n"
      "archive(d + '/unicode4.pt', head + b'X' + struct.pack('<I', 0xF0000000) + b'abc', {})\n"
      "# a real tensor file, then its pickle edited: storage numel and tensor sizes\n"
      "buf = io.BytesIO(); torch.save({'w': torch.arange(6, dtype=torch.float32)}, buf)\n"
      "z = zipfile.ZipFile(io.BytesIO(buf.getvalue()))\n"
      "prefix = z.namelist()[0].split('/')[0]\n"
      "pkl = z.read(prefix + '/data.pkl'); data = z.read(prefix + '/data/0')\n"
      "assert b'K\\x06' in pkl, pkl\n"
      "assert b'K\\x06t' in pkl, pkl\n"
      "tera = b'\\x8a\\x06\\x00\\x10\\xa5\\xd4\\xe8\\x00'  # LONG1 10**12\n"
      "archive(d + '/numel.pt', pkl.replace(b'K\\x06t', tera + b't', 1), {'0': data})\n"
      "archive(d + '/size.pt', pkl.replace(b'K\\x06\\x85', tera + b'\\x85', 1), {'0': data})\n"
      "big = b'\\x8a\\x08' + (1 << 62).to_bytes(8, 'little')\n"
      "archive(d + '/overflow.pt', pkl.replace(b'K\\x06\\x85', big + b'K\\x04\\x86', 1).replace(b'K\\x01\\x85', b'K\\x04' + big + b'\\x86', 1), {'0': data})\n"
      "archive(d + '/sizes.pt', pkl.replace(b'K\\x06\\x85', b'J\\x40\\x42\\x0f\\x00J\\x40\\x42\\x0f\\x00\\x86', 1).replace(b'K\\x01\\x85', b'J\\x40\\x42\\x0f\\x00K\\x01\\x86', 1), {'0': data})\n"
      "# zip records claiming more than the file holds (central directory and local header)\n"
      "for name, claim in (('record1t', 1 << 40), ('record3g', 3 << 30)):\n"
      "    archive(d + '/' + name + '.pt', pkl, {'0': data})\n"
      "    raw = bytearray(open(d + '/' + name + '.pt', 'rb').read())\n"
      "    entry = b'archive/data/0'\n"
      "    size = min(claim, 0xFFFFFFFE)\n"
      "    at = raw.find(b'PK\\x03\\x04' + b'\\x14\\x00')\n"
      "    while at >= 0:\n"
      "        if raw[at + 30:at + 30 + len(entry)] == entry: struct.pack_into('<II', raw, at + 18, size, size)\n"
      "        at = raw.find(b'PK\\x03\\x04', at + 4)\n"
      "    at = raw.find(b'PK\\x01\\x02')\n"
      "    while at >= 0:\n"
      "        if raw[at + 46:at + 46 + len(entry)] == entry: struct.pack_into('<II', raw, at + 20, size, size)\n"
      "        at = raw.find(b'PK\\x01\\x02', at + 4)\n"
      "    open(d + '/' + name + '.pt', 'wb').write(bytes(raw))\n"
      "print('forged')\n");
  ASSERT_NE(made.find("forged"), std::string::npos) << made;

  for (const std::string name :
       {"unicode8", "unicode4", "numel", "size", "sizes", "overflow", "record1t", "record3g"}) {
    SCOPED_TRACE(name);
    const std::string path = d + "/" + name + ".pt";
    size_t virtual_pages = 0;
    std::ifstream("/proc/self/statm") >> virtual_pages;
    int pipe_fds[2];
    ASSERT_EQ(::pipe(pipe_fds), 0);
    const pid_t child = ::fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      ::close(pipe_fds[0]);
      rlimit limit{};
      ::getrlimit(RLIMIT_AS, &limit);
      limit.rlim_cur = virtual_pages * ::sysconf(_SC_PAGESIZE) + (size_t{1} << 30);
      ::setrlimit(RLIMIT_AS, &limit);
      // Peak resident memory of this child from here on: reset the high-water
      // mark, read, then compare it with where it started.
      auto status_kib = [](const std::string& field) {
        std::ifstream in("/proc/self/status");
        for (std::string line; std::getline(in, line);) {
          if (line.rfind(field + ":", 0) == 0) return std::stol(line.substr(field.size() + 1));
        }
        return -1L;
      };
      std::ofstream("/proc/self/clear_refs") << "5";
      const long before = status_kib("VmRSS");
      std::string message = "read without an error";
      try {
        fabric::read_checkpoint(path);
      } catch (const std::exception& e) {
        message = e.what();
      }
      message = std::to_string(status_kib("VmHWM") - before) + " " + message;
      (void)!::write(pipe_fds[1], message.data(), message.size());
      ::_exit(0);
    }
    ::close(pipe_fds[1]);
    std::string message;
    char buffer[4096];
    for (ssize_t n; (n = ::read(pipe_fds[0], buffer, sizeof buffer)) > 0;) message.append(buffer, n);
    ::close(pipe_fds[0]);
    int status = 0;
    ASSERT_EQ(::waitpid(child, &status, 0), child);
    EXPECT_TRUE(WIFEXITED(status)) << "the reader crashed on " << path;
    const auto space = message.find(' ');
    ASSERT_NE(space, std::string::npos) << message;
    const long grew_kib = std::stol(message.substr(0, space));
    message = message.substr(space + 1);
    EXPECT_NE(message.find(path), std::string::npos) << message;
    for (const char* allocation_failure : {"not enough memory", "bad_alloc", "allocate"}) {
      EXPECT_EQ(message.find(allocation_failure), std::string::npos)
          << "the reader tried to allocate what the file claims: " << message;
    }
    std::cout << name << ": " << message.substr(0, 300) << "\n"
              << name << ": resident memory grew by " << grew_kib << " KiB while reading\n";
    EXPECT_GE(grew_kib, 0);
    EXPECT_LT(grew_kib, 256 * 1024);  // far below any claim
  }
}
