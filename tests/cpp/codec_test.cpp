#include <gtest/gtest.h>

#include <cstring>
#include <string>

#include "tensorvigil/error.h"
#include "tensorvigil/store/codec.h"
#include "tensorvigil/store/crc32c.h"
#include "tensorvigil/store/format.h"
#include "test_util.h"

using namespace tensorvigil;
using namespace tensorvigil::store;

TEST(Crc32c, KnownVectors) {
  EXPECT_EQ(crc32c("123456789", 9), 0xE3069283u);
  EXPECT_EQ(crc32c("", 0), 0u);
  std::vector<uint8_t> zeros(32, 0);
  EXPECT_EQ(crc32c(zeros.data(), zeros.size()), 0x8A9136AAu);  // RFC 3720 B.4
  std::vector<uint8_t> ones(32, 0xff);
  EXPECT_EQ(crc32c(ones.data(), ones.size()), 0x62A8AB43u);
}

TEST(Crc32c, IncrementalEqualsOneShot) {
  std::string s(1000, 'x');
  for (std::size_t i = 0; i < s.size(); ++i) s[i] = static_cast<char>(i * 7);
  uint32_t one = crc32c(s.data(), s.size());
  uint32_t inc = crc32c(s.data() + 333, s.size() - 333, crc32c(s.data(), 333));
  EXPECT_EQ(one, inc);
}

TEST(Shuffle, RoundTripAllElementSizes) {
  std::vector<uint8_t> in(1003);
  for (std::size_t i = 0; i < in.size(); ++i) in[i] = static_cast<uint8_t>(i * 31 + 7);
  for (std::size_t elem : {1, 2, 3, 4, 8}) {
    std::vector<uint8_t> sh(in.size()), back(in.size());
    byte_shuffle(in.data(), sh.data(), in.size(), elem);
    byte_unshuffle(sh.data(), back.data(), in.size(), elem);
    EXPECT_EQ(in, back) << "elem " << elem;
  }
  // Layout: byte b of element i goes to b * count + i.
  uint8_t a[8] = {0, 1, 2, 3, 4, 5, 6, 7}, s[8];
  byte_shuffle(a, s, 8, 4);
  uint8_t want[8] = {0, 4, 1, 5, 2, 6, 3, 7};
  EXPECT_EQ(0, std::memcmp(s, want, 8));
}

TEST(Shuffle, SimdPathsMatchTheDefinition) {
  std::vector<uint8_t> in(4 * 1000 + 3);
  for (std::size_t i = 0; i < in.size(); ++i) in[i] = static_cast<uint8_t>(i * 131 + (i >> 8));
  for (std::size_t elem : {2, 4, 8}) {
    std::vector<uint8_t> got(in.size()), want(in.size());
    std::size_t count = in.size() / elem;
    for (std::size_t i = 0; i < count; ++i)
      for (std::size_t b = 0; b < elem; ++b) want[b * count + i] = in[i * elem + b];
    for (std::size_t k = count * elem; k < in.size(); ++k) want[k] = in[k];
    byte_shuffle(in.data(), got.data(), in.size(), elem);
    EXPECT_EQ(got, want) << "elem " << elem;
  }
}

class CodecRoundTrip : public ::testing::TestWithParam<Codec> {};

TEST_P(CodecRoundTrip, ManySizes) {
  for (std::size_t n : {0u, 1u, 7u, 4096u, 100000u, 1000003u}) {
    auto f = tvtest::random_floats(n, n);
    const auto* raw = reinterpret_cast<const uint8_t*>(f.data());
    std::size_t nbytes = n * 4;
    auto payload = encode_payload(GetParam(), raw, nbytes, 4, 1, 64 << 10);
    std::vector<float> back(n);
    decode_payload(GetParam(), payload.data(), payload.size(), 4,
                   reinterpret_cast<uint8_t*>(back.data()), nbytes, "test", 2);
    EXPECT_TRUE(n == 0 || std::memcmp(back.data(), f.data(), nbytes) == 0) << n;
  }
}

INSTANTIATE_TEST_SUITE_P(AllCodecs, CodecRoundTrip,
                         ::testing::Values(Codec::kRaw, Codec::kZstd, Codec::kShuffleZstd));

TEST(Codec, ShuffleCompressesFloatsBetterThanPlainZstd) {
  auto f = tvtest::random_floats(1 << 18, 1);
  const auto* raw = reinterpret_cast<const uint8_t*>(f.data());
  auto plain = encode_payload(Codec::kZstd, raw, f.size() * 4, 4, 1);
  auto shuf = encode_payload(Codec::kShuffleZstd, raw, f.size() * 4, 4, 1);
  EXPECT_LT(shuf.size(), plain.size());
  EXPECT_LT(shuf.size(), f.size() * 4);
}

TEST(Codec, ShuffleZstdBeatsPlainZstdOnBf16RoundedFloats) {
  // Floats whose low 16 bits are zero (bf16-trained weights saved as f32): two byte planes are
  // all zeros and the exponent plane is low-entropy.
  auto f = tvtest::random_floats(1 << 18, 5);
  for (auto& x : f) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    u &= 0xffff0000u;
    std::memcpy(&x, &u, 4);
  }
  const auto* raw = reinterpret_cast<const uint8_t*>(f.data());
  auto shuf = encode_payload(Codec::kShuffleZstd, raw, f.size() * 4, 4, 1);
  EXPECT_LT(shuf.size() * 2.5, f.size() * 4.0);
  std::vector<float> back(f.size());
  decode_payload(Codec::kShuffleZstd, shuf.data(), shuf.size(), 4,
                 reinterpret_cast<uint8_t*>(back.data()), f.size() * 4, "t");
  EXPECT_EQ(0, std::memcmp(back.data(), f.data(), f.size() * 4));
}

TEST(Codec, PlaneTableOverrunIsDataLoss) {
  auto f = tvtest::random_floats(4096, 9);  // one 16 KiB chunk
  const auto* raw = reinterpret_cast<const uint8_t*>(f.data());
  std::vector<uint8_t> out(chunk_bound(Codec::kShuffleZstd, f.size() * 4, 4));
  std::size_t n = encode_chunk(Codec::kShuffleZstd, raw, f.size() * 4, 4, 1, out.data());
  ASSERT_LT(n, f.size() * 4);
  std::vector<uint8_t> back(f.size() * 4);
  for (uint32_t bad : {0xffffffffu, 0u, static_cast<uint32_t>(n)}) {
    auto c = out;
    std::memcpy(c.data() + 4, &bad, 4);  // plane 1 length
    EXPECT_THROW(decode_chunk(Codec::kShuffleZstd, c.data(), n, 4, back.data(), back.size(), "t"),
                 Error);
  }
}

TEST(Codec, CorruptChunkIsDataLoss) {
  auto f = tvtest::random_floats(100000, 3);
  const auto* raw = reinterpret_cast<const uint8_t*>(f.data());
  auto payload = encode_payload(Codec::kShuffleZstd, raw, f.size() * 4, 4, 1, 64 << 10);
  std::vector<float> back(f.size());
  for (std::size_t pos : {std::size_t{0}, std::size_t{5}, std::size_t{12}, payload.size() / 2,
                          payload.size() - 1}) {
    auto bad = payload;
    bad[pos] ^= 0x10;
    try {
      decode_payload(Codec::kShuffleZstd, bad.data(), bad.size(), 4,
                     reinterpret_cast<uint8_t*>(back.data()), f.size() * 4, "test");
      ADD_FAILURE() << "flip at " << pos << " not detected";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kDataLoss) << e.what();
    }
  }
  // Truncated payload.
  auto cut = payload;
  cut.resize(cut.size() - 10);
  EXPECT_THROW(decode_payload(Codec::kShuffleZstd, cut.data(), cut.size(), 4,
                              reinterpret_cast<uint8_t*>(back.data()), f.size() * 4, "test"),
               Error);
}

TEST(Format, TensorMetaRoundTrip) {
  TensorMeta m;
  m.name = "encoder.layers.0.attn.weight/grad";
  m.step = 1234567890123;
  m.mode_step = 17;
  m.mode = Mode::kEval;
  m.dtype = DType::kBFloat16;
  m.shape = {3, 0, 5};
  m.raw_nbytes = 0;
  m.wall_time = 1.7e9;
  m.stats.numel = 0;
  m.stats.hist = {1, 2, 3};
  m.stats.hist_lo = -1;
  m.stats.hist_hi = 1;
  m.stats.exp_hist.assign(kExpHistBuckets, 0);
  m.stats.exp_hist[100] = 5;
  m.stats.exp_hist[120] = 6;
  auto bytes = encode_tensor_meta(m);
  TensorMeta d = decode_tensor_meta(bytes.data(), bytes.size(), "t");
  EXPECT_EQ(d.name, m.name);
  EXPECT_EQ(d.step, m.step);
  EXPECT_EQ(d.mode_step, 17);
  EXPECT_EQ(d.mode, Mode::kEval);
  EXPECT_EQ(d.dtype, DType::kBFloat16);
  EXPECT_EQ(d.shape, m.shape);
  EXPECT_EQ(d.stats.hist, m.stats.hist);
  EXPECT_EQ(d.stats.exp_hist, m.stats.exp_hist);
  // Every truncation is detected, never read past the end.
  for (std::size_t n = 0; n < bytes.size(); ++n)
    EXPECT_THROW(decode_tensor_meta(bytes.data(), n, "t"), Error) << n;
}

TEST(Format, FrameHeaderRejectsFlipsAndBounds) {
  FrameHeader h;
  h.kind = FrameKind::kTensor;
  h.codec = Codec::kShuffleZstd;
  h.meta_len = 100;
  h.payload_len = 1000;
  uint8_t b[kFrameHeaderSize];
  encode_frame_header(b, h);
  FrameHeader d;
  ASSERT_TRUE(decode_frame_header(b, &d));
  EXPECT_EQ(d.total(), kFrameHeaderSize + 1100);
  for (std::size_t i = 0; i < kFrameHeaderSize; ++i)
    for (int bit = 0; bit < 8; ++bit) {
      uint8_t c[kFrameHeaderSize];
      std::memcpy(c, b, sizeof c);
      c[i] ^= static_cast<uint8_t>(1u << bit);
      EXPECT_FALSE(decode_frame_header(c, &d)) << i << ":" << bit;
    }
}

TEST(Format, UnknownNamesAreInvalidArgument) {
  try {
    codec_from_name("lz4");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("lz4"), std::string::npos);
  }
  EXPECT_THROW(dtype_from_name("complex64"), Error);
  EXPECT_THROW(dtype_from_code(0), Error);
  EXPECT_EQ(dtype_from_name("bf16"), DType::kBFloat16);
}
