// Pins the byte layout of tensorvigil-store v1 against the committed golden run
// (tests/data/format_v1/run, written by tests/data/format_v1/make_golden.py).
#include <gtest/gtest.h>

#include <cstring>

#include "tensorvigil/store/crc32c.h"
#include "tensorvigil/store/format.h"
#include "tensorvigil/store/run_reader.h"
#include "test_util.h"

using namespace tensorvigil;
using namespace tensorvigil::store;

namespace {
const std::string kRun = std::string(TV_TEST_DATA_DIR) + "/format_v1/run";

uint32_t u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
uint64_t u64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
}  // namespace

TEST(FormatGolden, ShardHeaderBytes) {
  auto b = tvtest::read_file(kRun + "/rank-00000/shard-00000001.tvs");
  ASSERT_GE(b.size(), kShardHeaderSize);
  // "TVSHARD\0", major 1, minor 0, rank 0, seq 1, reserved zeros, CRC-32C of bytes 0..27.
  const uint8_t want[28] = {'T', 'V', 'S', 'H', 'A', 'R', 'D', 0,  // magic
                            1,   0,                                // major
                            0,   0,                                // minor
                            0,   0,   0,   0,                      // rank
                            1,   0,   0,   0,                      // seq
                            0,   0,   0,   0,   0,   0,   0,   0}; // reserved
  EXPECT_EQ(0, std::memcmp(b.data(), want, 28));
  EXPECT_EQ(u32(b.data() + 28), crc32c(b.data(), 28));
  uint8_t again[kShardHeaderSize];
  encode_shard_header(again, 0, 1);
  EXPECT_EQ(0, std::memcmp(again, b.data(), kShardHeaderSize));
}

TEST(FormatGolden, FramesFooterAndIndexDecodeAndReencodeIdentically) {
  for (const char* shard : {"/rank-00000/shard-00000000.tvs", "/rank-00000/shard-00000002.tvs",
                            "/rank-00001/shard-00000000.tvs"}) {
    auto b = tvtest::read_file(kRun + shard);
    ASSERT_GE(b.size(), kShardHeaderSize + kFooterSize);
    uint64_t ioff, ilen;
    uint32_t n;
    ASSERT_TRUE(decode_footer(b.data() + b.size() - kFooterSize, &ioff, &ilen, &n)) << shard;
    EXPECT_EQ(0, std::memcmp(b.data() + b.size() - kFooterSize, "TVFOOTER", 8));
    EXPECT_EQ(ioff + ilen + kFooterSize, b.size());
    uint64_t pos = kShardHeaderSize;
    uint32_t frames = 0;
    bool saw_tensor = false, saw_commit = false;
    while (pos < ioff) {
      FrameHeader h;
      ASSERT_TRUE(decode_frame_header(b.data() + pos, &h)) << shard << "@" << pos;
      EXPECT_EQ(u32(b.data() + pos), 0x46525654u);  // "TVRF"
      uint8_t re[kFrameHeaderSize];
      encode_frame_header(re, h);
      EXPECT_EQ(0, std::memcmp(re, b.data() + pos, kFrameHeaderSize));
      const uint8_t* meta = b.data() + pos + kFrameHeaderSize;
      EXPECT_EQ(crc32c(meta, h.meta_len), h.meta_crc);
      if (h.kind == FrameKind::kTensor) {
        saw_tensor = true;
        TensorMeta m = decode_tensor_meta(meta, h.meta_len, "golden");
        auto again = encode_tensor_meta(m);
        ASSERT_EQ(again.size(), h.meta_len) << m.name;
        EXPECT_EQ(0, std::memcmp(again.data(), meta, h.meta_len)) << m.name;
        EXPECT_EQ(u64(meta), static_cast<uint64_t>(m.step));  // step is the first field
        if (h.payload_len) {
          const uint8_t* payload = meta + h.meta_len;
          uint32_t nch = u32(payload + 4);
          EXPECT_EQ(crc32c(payload, 8 + 8 * nch), h.payload_crc);
        }
      } else if (h.kind == FrameKind::kCommit) {
        saw_commit = true;
        CommitMeta c = decode_commit_meta(meta, h.meta_len, "golden");
        auto again = encode_commit_meta(c);
        EXPECT_EQ(0, std::memcmp(again.data(), meta, h.meta_len));
      }
      pos += h.total();
      ++frames;
    }
    EXPECT_EQ(pos, ioff);
    EXPECT_EQ(frames, n);
    EXPECT_TRUE(saw_tensor && saw_commit);
  }
}

TEST(FormatGolden, ReaderSeesTheGoldenRun) {
  RunReader r(kRun);
  EXPECT_EQ(r.ranks(), (std::vector<uint32_t>{0, 1}));
  EXPECT_TRUE(r.ended(0));
  EXPECT_TRUE(r.ended(1));
  EXPECT_EQ(r.commits().size(), 4u);
  int64_t id = r.name_id("fc1.weight");
  ASSERT_GE(id, 0);
  std::optional<RecordInfo> rec = r.find(static_cast<uint32_t>(id), 1, 0);
  ASSERT_TRUE(rec.has_value());
  EXPECT_EQ(rec->codec, Codec::kRaw);
  EXPECT_EQ(rec->shape, (std::vector<int64_t>{4, 6}));
  std::vector<float> v(24);
  r.read_value(*rec, v.data());
  for (int i = 0; i < 24; ++i) EXPECT_FLOAT_EQ(v[i], static_cast<float>(i / 8.0 - 1.0 + 1));
  std::optional<RecordInfo> grad = r.find(static_cast<uint32_t>(r.name_id("fc1.weight/grad")), 0, 0);
  ASSERT_TRUE(grad.has_value());
  // Histograms are not held in memory per record; load_histograms() reads them back.
  EXPECT_TRUE(grad->hists_elided);
  EXPECT_TRUE(grad->stats.hist.empty());
  RecordInfo full = *grad;
  r.load_histograms(full);
  EXPECT_EQ(full.stats.hist.size(), 8u);
  EXPECT_EQ(full.stats.exp_hist.size(), static_cast<std::size_t>(kExpHistBuckets));
  std::optional<RecordInfo> bias = r.find(static_cast<uint32_t>(r.name_id("fc1.bias")), 2, 0);
  ASSERT_TRUE(bias.has_value());
  EXPECT_EQ(bias->stats.nan, 1u);
  EXPECT_EQ(bias->stats.posinf, 1u);
  EXPECT_EQ(bias->mode, Mode::kEval);
}
