#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <set>
#include <thread>

#include "tensorvigil/error.h"
#include "tensorvigil/stats/reduce.h"
#include "tensorvigil/store/run_reader.h"
#include "tensorvigil/store/stream_writer.h"
#include "test_util.h"

using namespace tensorvigil;
using namespace tensorvigil::store;
namespace fs = std::filesystem;

namespace {
TensorView view_of(const std::vector<float>& v, std::vector<int64_t> shape) {
  return tvtest::float_view(v, std::move(shape));
}

void expect_value(const RunReader& r, const std::string& name, int64_t step, uint32_t rank,
                  const std::vector<float>& want) {
  int64_t id = r.name_id(name);
  ASSERT_GE(id, 0) << name;
  std::optional<RecordInfo> rec = r.find(static_cast<uint32_t>(id), step, rank);
  ASSERT_TRUE(rec.has_value()) << name << "@" << step;
  std::vector<float> got(want.size());
  r.read_value(*rec, got.data(), 2);
  EXPECT_EQ(0, std::memcmp(got.data(), want.data(), want.size() * 4)) << name << "@" << step;
}
}  // namespace

TEST(Store, WriteReadAllCodecsAndStats) {
  tvtest::TempDir dir;
  auto a = tvtest::random_floats(300000, 1);
  auto b = tvtest::random_floats(17, 2);
  {
    WriterOptions o;
    o.chunk_size = 64 << 10;
    StreamWriter w(dir.path(), 0, o);
    for (int step = 0; step < 5; ++step) {
      w.write_tensor("a", step, Mode::kTrain, step, view_of(a, {600, 500}), false, {}, Codec::kShuffleZstd);
      w.write_tensor("b", step, Mode::kTrain, step, view_of(b, {17}), false, {}, Codec::kRaw);
      w.write_tensor("c", step, Mode::kTrain, step, view_of(a, {300000}), true);  // stats only
      w.commit_step(step, Mode::kTrain, step);
    }
    w.close();
    auto c = w.counters();
    EXPECT_EQ(c.tensors, 15u);
    EXPECT_EQ(c.commits, 5u);
    EXPECT_LT(c.stored_bytes, c.raw_bytes);
  }
  RunReader r(dir.path());
  EXPECT_EQ(r.ranks(), std::vector<uint32_t>{0});
  EXPECT_EQ(r.commits().size(), 5u);
  EXPECT_EQ(r.records().size(), 15u);
  EXPECT_TRUE(r.ended(0));
  EXPECT_FALSE(r.writer_alive(0));
  for (int step = 0; step < 5; ++step) {
    expect_value(r, "a", step, 0, a);
    expect_value(r, "b", step, 0, b);
  }
  std::optional<RecordInfo> c = r.find(static_cast<uint32_t>(r.name_id("c")), 3, 0);
  ASSERT_TRUE(c.has_value());
  EXPECT_FALSE(c->has_value());
  EXPECT_EQ(c->stats.numel, 300000u);
  EXPECT_THROW(r.read_value(*c, nullptr), Error);
  std::optional<RecordInfo> ra = r.find(static_cast<uint32_t>(r.name_id("a")), 0, 0);
  EXPECT_EQ(ra->shape, (std::vector<int64_t>{600, 500}));
  EXPECT_NEAR(ra->stats.std(), 0.02, 1e-3);
}

TEST(Store, ShardsRollBySizeAndSealedIndexIsUsed) {
  tvtest::TempDir dir;
  auto a = tvtest::random_floats(50000, 1);
  WriterOptions o;
  o.roll_bytes = 100 << 10;
  {
    StreamWriter w(dir.path(), 3, o);
    for (int step = 0; step < 20; ++step) {
      w.write_tensor("a", step, Mode::kTrain, step, view_of(a, {50000}));
      w.commit_step(step, Mode::kTrain, step);
    }
    w.close();
    EXPECT_GT(w.counters().shards, 5u);
  }
  RunReader r(dir.path());
  EXPECT_EQ(r.ranks(), std::vector<uint32_t>{3});
  EXPECT_EQ(r.commits().size(), 20u);
  for (int step = 0; step < 20; step += 7) expect_value(r, "a", step, 3, a);
}

TEST(Store, RollsByTimeWhileIdle) {
  tvtest::TempDir dir;
  auto a = tvtest::random_floats(100, 1);
  WriterOptions o;
  o.roll_seconds = 0.2;
  StreamWriter w(dir.path(), 0, o);
  w.write_tensor("a", 0, Mode::kTrain, 0, view_of(a, {100}));
  w.commit_step(0, Mode::kTrain, 0);
  w.flush();
  std::this_thread::sleep_for(std::chrono::milliseconds(700));
  // The idle timer sealed shard 0: it has a footer now.
  auto bytes = tvtest::read_file(dir.path() + "/rank-00000/shard-00000000.tvs");
  ASSERT_GE(bytes.size(), kFooterSize);
  EXPECT_EQ(0, std::memcmp(bytes.data() + bytes.size() - kFooterSize, kFooterMagic, 8));
  w.close();
}

TEST(Store, LiveReaderSeesOnlyCommittedSteps) {
  tvtest::TempDir dir;
  auto a = tvtest::random_floats(1000, 1);
  StreamWriter w(dir.path(), 0);
  w.write_tensor("a", 0, Mode::kTrain, 0, view_of(a, {1000}));
  w.commit_step(0, Mode::kTrain, 0);
  w.write_tensor("a", 1, Mode::kTrain, 1, view_of(a, {1000}));
  w.flush();
  RunReader r(dir.path());
  EXPECT_TRUE(r.writer_alive(0));
  EXPECT_FALSE(r.ended(0));
  EXPECT_EQ(r.commits().size(), 1u);
  EXPECT_FALSE(r.find(0, 1, 0).has_value());  // written, not committed
  w.commit_step(1, Mode::kTrain, 1);
  w.flush();
  EXPECT_EQ(r.refresh(), 1u);
  expect_value(r, "a", 1, 0, a);
  w.close();
  r.refresh();
  EXPECT_TRUE(r.ended(0));
}

TEST(Store, SecondWriterOnSameRankIsRefused) {
  tvtest::TempDir dir;
  StreamWriter w(dir.path(), 0);
  try {
    StreamWriter w2(dir.path(), 0);
    FAIL() << "second writer accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kFailedPrecondition);
  }
  StreamWriter other_rank(dir.path(), 1);  // a different rank is fine
  w.close();
  StreamWriter w3(dir.path(), 0);  // lock released on close
}

TEST(Store, SkipPolicyDropsPayloadKeepsStats) {
  tvtest::TempDir dir;
  auto a = tvtest::random_floats(1 << 20, 1);  // 4 MiB
  WriterOptions o;
  o.policy = PendingPolicy::kSkip;
  o.max_pending_bytes = 20 << 20;
  o.threads = 1;
  {
    StreamWriter w(dir.path(), 0, o);
    for (int i = 0; i < 20; ++i) w.write_tensor("t" + std::to_string(i), 0, Mode::kTrain, 0, view_of(a, {1 << 20}));
    w.commit_step(0, Mode::kTrain, 0);
    w.close();
    auto c = w.counters();
    EXPECT_GT(c.dropped, 0u);
    EXPECT_LE(c.peak_pending_bytes, o.max_pending_bytes);
  }
  RunReader r(dir.path());
  int dropped = 0;
  for (const auto& rec : r.records()) {
    EXPECT_EQ(rec.stats.numel, 1u << 20);
    if (rec.flags & kFlagDropped) ++dropped;
  }
  EXPECT_GT(dropped, 0);
  EXPECT_EQ(r.records().size(), 20u);
}

TEST(Store, BlockPolicyBoundsPendingMemory) {
  tvtest::TempDir dir;
  auto a = tvtest::random_floats(1 << 20, 1);
  WriterOptions o;
  o.max_pending_bytes = 12 << 20;
  StreamWriter w(dir.path(), 0, o);
  for (int i = 0; i < 30; ++i) w.write_tensor("t" + std::to_string(i), 0, Mode::kTrain, 0, view_of(a, {1 << 20}));
  w.commit_step(0, Mode::kTrain, 0);
  w.close();
  auto c = w.counters();
  EXPECT_EQ(c.dropped, 0u);
  EXPECT_EQ(c.tensors, 30u);
  EXPECT_LE(c.peak_pending_bytes, o.max_pending_bytes);
}

TEST(Store, CommittedStepsSurviveSigkill) {
  for (int trial = 0; trial < 6; ++trial) {
    tvtest::TempDir dir;
    int pipefd[2];
    ASSERT_EQ(pipe(pipefd), 0);
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      close(pipefd[0]);
      auto a = tvtest::random_floats(20000, 7);
      WriterOptions o;
      o.roll_bytes = 200 << 10;
      StreamWriter w(dir.path(), 0, o);
      for (int64_t step = 0;; ++step) {
        for (int k = 0; k < 3; ++k)
          w.write_tensor("t" + std::to_string(k), step, Mode::kTrain, step, view_of(a, {20000}));
        w.commit_step(step, Mode::kTrain, step);
        if (step % 5 == 4) {
          w.flush();
          int64_t done = step;
          if (write(pipefd[1], &done, sizeof done) != sizeof done) _exit(1);
        }
      }
    }
    close(pipefd[1]);
    int64_t flushed = -1, v;
    for (int i = 0; i < 2 + trial; ++i)
      if (read(pipefd[0], &v, sizeof v) == sizeof v) flushed = v;
    std::this_thread::sleep_for(std::chrono::microseconds(500 * trial));
    kill(pid, SIGKILL);
    int status;
    waitpid(pid, &status, 0);
    close(pipefd[0]);
    ASSERT_GE(flushed, 4);
    RunReader r(dir.path());
    EXPECT_FALSE(r.writer_alive(0));
    EXPECT_FALSE(r.ended(0));
    auto a = tvtest::random_floats(20000, 7);
    std::set<int64_t> steps;
    for (const auto& c : r.commits()) steps.insert(c.step);
    for (int64_t s = 0; s <= flushed; ++s) ASSERT_TRUE(steps.count(s)) << "lost committed step " << s;
    for (const auto& c : r.commits()) {
      EXPECT_EQ(c.num_tensors, 3u);
      for (int k = 0; k < 3; ++k) expect_value(r, "t" + std::to_string(k), c.step, 0, a);
    }
    // A restarted writer continues in a new shard; old committed steps stay readable.
    StreamWriter w(dir.path(), 0);
    w.write_tensor("t0", 1000, Mode::kTrain, 1000, view_of(a, {20000}));
    w.commit_step(1000, Mode::kTrain, 1000);
    w.close();
    RunReader r2(dir.path());
    EXPECT_EQ(r2.commits().size(), r.commits().size() + 1);
    expect_value(r2, "t0", 1000, 0, a);
  }
}

TEST(Store, InterleavedStepsNeverLoseFramesAcrossRolls) {
  tvtest::TempDir dir;
  auto a = tvtest::random_floats(10000, 1);
  WriterOptions o;
  o.roll_bytes = 1;  // roll at every opportunity
  {
    StreamWriter w(dir.path(), 0, o);
    // Step s+1's first tensor is written before step s is committed.
    w.write_tensor("x", 0, Mode::kTrain, 0, view_of(a, {10000}));
    for (int s = 0; s < 6; ++s) {
      w.write_tensor("x", s + 1, Mode::kTrain, s + 1, view_of(a, {10000}));
      w.write_tensor("y", s, Mode::kTrain, s, view_of(a, {10000}));
      w.commit_step(s, Mode::kTrain, s);
    }
    w.commit_step(6, Mode::kTrain, 6);
    w.close();
  }
  RunReader r(dir.path());
  ASSERT_EQ(r.commits().size(), 7u);
  for (int s = 0; s <= 6; ++s) expect_value(r, "x", s, 0, a);
  for (int s = 0; s < 6; ++s) expect_value(r, "y", s, 0, a);
  for (const auto& c : r.commits()) EXPECT_EQ(c.num_tensors, c.step < 6 ? 2u : 1u) << c.step;
}

TEST(Store, EndedResetsWhenAWriterContinuesTheRank) {
  tvtest::TempDir dir;
  auto a = tvtest::random_floats(10, 1);
  {
    StreamWriter w(dir.path(), 0);
    w.write_tensor("x", 0, Mode::kTrain, 0, view_of(a, {10}));
    w.commit_step(0, Mode::kTrain, 0);
    w.close();
  }
  StreamWriter w2(dir.path(), 0);
  w2.write_tensor("x", 1, Mode::kTrain, 1, view_of(a, {10}));
  w2.commit_step(1, Mode::kTrain, 1);
  w2.flush();
  RunReader r(dir.path());
  EXPECT_FALSE(r.ended(0));
  EXPECT_EQ(r.commits().size(), 2u);
  w2.close();
  r.refresh();
  EXPECT_TRUE(r.ended(0));
}

TEST(Store, RecordTableRewritesOutOfOrderStepsAndRangeSelect) {
  tvtest::TempDir dir;
  auto a = tvtest::random_floats(16, 1);
  auto b = tvtest::random_floats(16, 2);
  {
    // Rank 0: steps 0..9, then a restarted writer rewrites 5..7 with other values and goes
    // back to step 2, then writes 12 and 11 (out of order for the same tensor). Rank 1: steps 0..9, and a
    // tensor "z" only at odd steps.
    StreamWriter w0(dir.path(), 0);
    StreamWriter w1(dir.path(), 1);
    for (int s = 0; s < 10; ++s) {
      w0.write_tensor("x", s, Mode::kTrain, s, view_of(a, {16}));
      w0.commit_step(s, Mode::kTrain, s);
      w1.write_tensor("x", s, Mode::kTrain, s, view_of(a, {4, 4}));
      if (s % 2) w1.write_tensor("z", s, Mode::kEval, s, view_of(b, {16}));
      w1.commit_step(s, s % 2 ? Mode::kEval : Mode::kTrain, s);
    }
    w0.close();
    w1.close();
  }
  {
    StreamWriter w0(dir.path(), 0);
    for (int s : {5, 6, 7, 2, 12, 11}) {
      w0.write_tensor("x", s, Mode::kTrain, s, view_of(b, {16}));
      w0.commit_step(s, Mode::kTrain, s);
    }
    w0.close();
  }
  RunReader r(dir.path());
  const uint32_t x = static_cast<uint32_t>(r.name_id("x"));
  const uint32_t z = static_cast<uint32_t>(r.name_id("z"));
  EXPECT_EQ(r.num_records(), 10u + 10u + 5u + 2u);  // rewrites replace, they do not add
  expect_value(r, "x", 11, 0, b);
  expect_value(r, "x", 12, 0, b);
  for (int s = 0; s < 10; ++s) {
    bool rewritten = s == 2 || (s >= 5 && s <= 7);
    expect_value(r, "x", s, 0, rewritten ? b : a);
    expect_value(r, "x", s, 1, a);
    EXPECT_EQ(r.find(z, s, 1).has_value(), s % 2 == 1) << s;
    EXPECT_FALSE(r.find(z, s, 0).has_value());
  }
  EXPECT_EQ(r.find(x, 3, 1)->shape, (std::vector<int64_t>{4, 4}));
  EXPECT_EQ(r.find(x, 3, 0)->shape, (std::vector<int64_t>{16}));
  EXPECT_FALSE(r.find(x, 10, 0).has_value());
  EXPECT_FALSE(r.find(x, 13, 0).has_value());
  // Every step range, rank and mode filter gives what a scan of the table gives, in table order.
  for (int64_t lo = -1; lo <= 10; ++lo)
    for (int64_t hi = lo; hi <= 13; ++hi)
      for (int mode : {-1, 0, 1}) {
        Selection sel;
        sel.step_min = lo;
        sel.step_max = hi;
        sel.mode = mode;
        if (lo == 3) sel.ranks = {1};
        if (hi == 9) sel.name_ids = {z};
        std::vector<std::size_t> want;
        for (std::size_t i = 0; i < r.num_records(); ++i) {
          const RecordRow& row = r.row(i);
          if (row.step < lo || row.step > hi) continue;
          if (mode >= 0 && static_cast<int>(row.mode) != mode) continue;
          if (!sel.ranks.empty() && row.rank != 1) continue;
          if (!sel.name_ids.empty() && row.name_id != z) continue;
          want.push_back(i);
        }
        EXPECT_EQ(r.select(sel), want) << lo << ".." << hi << " mode " << mode;
      }
  // The statistics columns follow the rows (a rewrite replaces them too).
  const StatsTable& st = r.stats_table();
  ASSERT_EQ(st.size(), r.num_records());
  for (std::size_t i = 0; i < r.num_records(); ++i) {
    RecordInfo rec = r.record(i);
    EXPECT_EQ(st.mean[i], rec.stats.mean);
    EXPECT_EQ(st.numel[i], 16u);
  }
  auto fresh = r.find(x, 6, 0);
  ASSERT_TRUE(fresh.has_value());
  double mean_b = 0;
  for (float v : b) mean_b += v;
  EXPECT_NEAR(fresh->stats.mean, mean_b / 16, 1e-6);
}

TEST(Store, RankAboveFiveDigitsIsRefused) {
  tvtest::TempDir dir;
  EXPECT_THROW(StreamWriter(dir.path(), 100000), Error);
}

TEST(ThreadPoolFork, ChildCanComputeLargeStatisticsAfterFork) {
  // The parent's pool workers do not exist in a forked child (e.g. a DataLoader worker): the
  // child must still finish (the caller runs the tasks itself) and gets a fresh pool.
  auto a = tvtest::random_floats(2000000, 3);  // several chunks: uses the pool
  TensorView v = view_of(a, {2000000});
  TensorStats parent = compute_stats(v);
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    TensorStats child = compute_stats(v);
    _exit(child.mean == parent.mean && child.numel == parent.numel ? 0 : 1);
  }
  int status = 0;
  for (int i = 0; i < 300; ++i) {  // 30 s at most: a hang is a failure, not a stuck test
    if (waitpid(pid, &status, WNOHANG) == pid) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    if (i == 299) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      FAIL() << "child hung computing statistics after fork";
    }
  }
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
}
