#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "tensorvigil/error.h"
#include "tensorvigil/store/run_reader.h"
#include "tensorvigil/store/stream_writer.h"
#include "test_util.h"

using namespace tensorvigil;
using namespace tensorvigil::store;

namespace {
std::string make_run(const std::string& dir, int steps = 4) {
  auto a = tvtest::random_floats(5000, 1);
  TensorView v;
  v.data = a.data();
  v.shape = {5000};
  StreamWriter w(dir, 0);
  for (int s = 0; s < steps; ++s) {
    w.write_tensor("a", s, Mode::kTrain, s, v);
    w.write_tensor("b", s, Mode::kTrain, s, v, true);
    w.commit_step(s, Mode::kTrain, s);
  }
  w.close();
  return dir + "/rank-00000/shard-00000000.tvs";
}

/// Opens the run and reads every value and statistic; returns the error code, or -1 when all
/// went through (then `digest` receives everything that was read).
int read_everything(const std::string& dir, bool strict = true, std::string* digest = nullptr) {
  try {
    RunReader r(dir, strict);
    std::string d;
    std::vector<uint8_t> buf(1 << 20);
    for (const auto& rec : r.records()) {
      d += r.names()[rec.name_id] + "@" + std::to_string(rec.step) + ":" +
           std::to_string(rec.stats.mean) + "," + std::to_string(rec.stats.m2) + ";";
      if (rec.has_value()) {
        r.read_value(rec, buf.data());
        d.append(reinterpret_cast<const char*>(buf.data()), rec.raw_nbytes);
      }
    }
    for (const auto& c : r.commits()) d += "commit" + std::to_string(c.step);
    if (digest) *digest = d;
    return -1;
  } catch (const Error& e) {
    return static_cast<int>(e.code());
  }
}
}  // namespace

TEST(Corruption, ForeignFileIsDataLoss) {
  tvtest::TempDir dir;
  std::string shard = make_run(dir.path());
  std::vector<uint8_t> junk(4096, 'x');
  tvtest::write_file(shard, junk);
  EXPECT_EQ(read_everything(dir.path()), static_cast<int>(ErrorCode::kDataLoss));
}

TEST(Corruption, EveryByteFlipIsDetectedOrHarmless) {
  tvtest::TempDir dir;
  std::string shard = make_run(dir.path(), 2);
  auto good = tvtest::read_file(shard);
  std::string good_digest;
  ASSERT_EQ(read_everything(dir.path(), true, &good_digest), -1);
  std::mt19937 rng(42);
  int detected = 0, harmless = 0;
  for (std::size_t i = 0; i < good.size(); i += 1 + rng() % 13) {
    auto bad = good;
    bad[i] ^= static_cast<uint8_t>(1u << (rng() % 8));
    tvtest::write_file(shard, bad);
    std::string digest;
    int code = read_everything(dir.path(), true, &digest);
    if (code == static_cast<int>(ErrorCode::kDataLoss)) {
      ++detected;
    } else {
      // A flip the reader does not notice must not change anything it returns (e.g. a flip in
      // the footer makes it fall back to scanning the intact frames; a flip inside a commit
      // frame of a sealed shard is not read, its index copy is).
      ASSERT_EQ(code, -1) << "byte " << i;
      EXPECT_EQ(digest, good_digest) << "flip at byte " << i << " changed what was read";
      ++harmless;
    }
  }
  EXPECT_GT(detected, 100);
  tvtest::write_file(shard, good);
  EXPECT_EQ(read_everything(dir.path()), -1);
}

TEST(Corruption, TruncationKeepsEarlierCommittedSteps) {
  tvtest::TempDir dir;
  std::string shard = make_run(dir.path(), 6);
  auto good = tvtest::read_file(shard);
  for (std::size_t cut = 0; cut < good.size(); cut += 97) {
    auto bad = std::vector<uint8_t>(good.begin(), good.begin() + cut);
    tvtest::write_file(shard, bad);
    RunReader r(dir.path());  // a torn tail is not an error
    std::vector<uint8_t> buf(1 << 20);
    for (const auto& rec : r.records())
      if (rec.has_value()) r.read_value(rec, buf.data());
    // Steps are committed in order: what survives is a prefix.
    for (std::size_t i = 0; i < r.commits().size(); ++i) EXPECT_EQ(r.commits()[i].step, static_cast<int64_t>(i));
  }
}

TEST(Corruption, NonStrictModeReportsAndKeepsPrefix) {
  tvtest::TempDir dir;
  std::string shard = make_run(dir.path(), 6);
  auto good = tvtest::read_file(shard);
  // Remove the footer so the reader scans, then flip a byte in the middle of the frames.
  auto bad = std::vector<uint8_t>(good.begin(), good.end() - kFooterSize);
  // Flip a byte of the first frame header after the middle: a structural error.
  std::size_t pos = kShardHeaderSize;
  while (pos < bad.size() / 2) {
    FrameHeader h;
    ASSERT_TRUE(decode_frame_header(bad.data() + pos, &h));
    pos += h.total();
  }
  bad[pos + 9] ^= 0x01;  // meta_len
  tvtest::write_file(shard, bad);
  EXPECT_EQ(read_everything(dir.path(), true), static_cast<int>(ErrorCode::kDataLoss));
  RunReader r(dir.path(), /*strict=*/false);
  ASSERT_EQ(r.problems().size(), 1u);
  EXPECT_NE(r.problems()[0].find("offset " + std::to_string(pos)), std::string::npos) << r.problems()[0];
  EXPECT_GE(r.commits().size(), 1u);
  EXPECT_LT(r.commits().size(), 6u);
}

TEST(Corruption, MissingRunIsNotFound) {
  try {
    RunReader r("/nonexistent/tensorvigil/run");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kNotFound);
  }
}
