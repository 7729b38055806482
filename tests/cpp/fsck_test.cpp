// fsck's shard checker and repair, the writer's fault injection, and reader bounds on forged
// footers (a fuzz finding).
#include <gtest/gtest.h>
#include <stdlib.h>

#include <cstring>
#include <filesystem>

#include "tensorvigil/error.h"
#include "tensorvigil/store/crc32c.h"
#include "tensorvigil/store/fsck.h"
#include "tensorvigil/store/run_reader.h"
#include "tensorvigil/store/stream_writer.h"
#include "test_util.h"

using namespace tensorvigil;
using namespace tensorvigil::store;

namespace {

std::string write_run(const std::string& dir, int steps) {
  std::vector<float> a(5000);
  for (std::size_t i = 0; i < a.size(); ++i) a[i] = static_cast<float>(i);
  TensorView v;
  v.data = a.data();
  v.dtype = DType::kFloat32;
  v.shape = {5000};
  StreamWriter w(dir, 0);
  for (int s = 0; s < steps; ++s) {
    w.write_tensor("a", s, Mode::kTrain, s, v);
    w.write_tensor("b", s, Mode::kTrain, s, v, /*stats_only=*/true);
    w.commit_step(s, Mode::kTrain, s);
  }
  w.close();
  return dir + "/rank-00000/shard-00000000.tvs";
}

}  // namespace

TEST(Fsck, CleanSealedShard) {
  tvtest::TempDir dir;
  std::string shard = write_run(dir.path(), 3);
  ShardCheck c = check_shard(shard, 0, 0, true);
  EXPECT_EQ(c.index_state, "sealed");
  EXPECT_EQ(c.scan_end, "index");
  EXPECT_TRUE(c.problems.empty());
  EXPECT_EQ(c.frames, 10u);  // 3 x (2 tensors + commit) + END
  EXPECT_EQ(c.values_checked, 3u);
  EXPECT_TRUE(c.ended);
  EXPECT_EQ(c.committed_steps, (std::vector<int64_t>{0, 1, 2}));
  EXPECT_EQ(check_shard(shard, 1, 0, false).problems.size(), 1u);  // wrong rank for the path
}

TEST(Fsck, TornShardIsRepairedToItsCommittedPrefix) {
  tvtest::TempDir dir;
  std::string shard = write_run(dir.path(), 3);
  auto bytes = tvtest::read_file(shard);
  ShardCheck full = check_shard(shard, 0, 0, false);
  bytes.resize(full.index_offset - 100);  // cut into the END frame's predecessor region
  tvtest::write_file(shard, bytes);
  ShardCheck c = check_shard(shard, 0, 0, true);
  EXPECT_EQ(c.index_state, "absent");
  EXPECT_TRUE(c.problems.empty());
  EXPECT_LT(c.commit_end, bytes.size());
  std::string out = shard + ".new";
  uint64_t n = write_sealed_copy(shard, c.commit_end, out);
  EXPECT_EQ(n, std::filesystem::file_size(out));
  ShardCheck r = check_shard(out, 0, 0, true);
  EXPECT_EQ(r.index_state, "sealed");
  EXPECT_EQ(r.committed_steps, c.committed_steps);
  EXPECT_THROW(write_sealed_copy(shard, c.commit_end - 1, shard + ".bad"), Error);
  std::filesystem::rename(out, shard);
  RunReader rd(dir.path());
  EXPECT_EQ(rd.commits().size(), c.committed_steps.size());
}

TEST(Fsck, ForgedFooterFrameCountIsNotTrustedForAllocation) {
  tvtest::TempDir dir;
  std::string shard = write_run(dir.path(), 1);
  auto b = tvtest::read_file(shard);
  const std::size_t f = b.size() - kFooterSize;
  uint32_t huge = 0xFFFFFFFFu;
  std::memcpy(b.data() + f + 24, &huge, 4);
  uint32_t crc = crc32c(b.data() + f, 28);
  std::memcpy(b.data() + f + 28, &crc, 4);
  tvtest::write_file(shard, b);
  try {
    RunReader r(dir.path());
    FAIL() << "forged footer accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kDataLoss) << e.what();
  }
  EXPECT_EQ(check_shard(shard, 0, 0, false).index_state, "index_corrupt");
}

TEST(Faults, InjectedWriteErrorStopsTheWriterAndKeepsCommittedSteps) {
  tvtest::TempDir dir;
  ::setenv("TENSORVIGIL_FAULTS", "fail_after_bytes=30000,errno=ENOSPC", 1);
  std::vector<float> a(4000, 1.0f);
  TensorView v;
  v.data = a.data();
  v.dtype = DType::kFloat32;
  v.shape = {4000};
  WriterOptions o;
  o.codec = Codec::kRaw;
  StreamWriter w(dir.path(), 0, o);
  ::unsetenv("TENSORVIGIL_FAULTS");
  bool failed = false;
  for (int s = 0; s < 20 && !failed; ++s) {
    try {
      w.write_tensor("a", s, Mode::kTrain, s, v);
      w.commit_step(s, Mode::kTrain, s);
      w.flush();
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kIo);
      EXPECT_NE(std::string(e.what()).find("No space left on device"), std::string::npos);
      EXPECT_NE(std::string(e.what()).find("shard-00000000.tvs"), std::string::npos);
      failed = true;
    }
  }
  EXPECT_TRUE(failed);
  EXPECT_THROW(w.close(), Error);
  RunReader r(dir.path());
  EXPECT_GE(r.commits().size(), 1u);
  EXPECT_LT(r.commits().size(), 20u);
  std::vector<float> got(4000);
  for (const auto& rec : r.records()) r.read_value(rec, got.data());
  StreamWriter again(dir.path(), 0);  // the lock was released
}
