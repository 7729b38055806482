// The tensor index beside each sealed shard (FORMAT.md §3.8) and the reader's lazy mode: a lazy
// reader must see exactly what an eager one sees, and a damaged, stale or forged tensor index
// must never change what is read.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <map>
#include <tuple>

#include "tensorvigil/error.h"
#include "tensorvigil/store/crc32c.h"
#include "tensorvigil/store/run_reader.h"
#include "tensorvigil/store/stream_writer.h"
#include "tensorvigil/store/tensor_index.h"
#include "test_util.h"

using namespace tensorvigil;
using namespace tensorvigil::store;
namespace fs = std::filesystem;

namespace {

TensorView view_of(const std::vector<float>& v, std::vector<int64_t> shape) {
  return tvtest::float_view(v, std::move(shape));
}

/// Two ranks; rank 0 restarted and rewrote steps (later wins across shards), wrote steps out
/// of order, interleaved a step's tensor before the previous commit, and left frames of a
/// step it never committed; rank 1 has eval steps and a tensor at odd steps only. Shards roll
/// often so that there are many sealed shards. The last writer of rank 1 stays open with an
/// unsealed shard when `live` (so lazy and eager shards mix).
std::unique_ptr<StreamWriter> write_scenario(const std::string& dir, bool live) {
  auto a = tvtest::random_floats(16, 1);
  auto b = tvtest::random_floats(16, 2);
  WriterOptions o;
  o.roll_bytes = 2500;
  o.codec = Codec::kRaw;
  {
    StreamWriter w0(dir, 0, o);
    StreamWriter w1(dir, 1, o);
    w0.write_tensor("x", 0, Mode::kTrain, 0, view_of(a, {16}));
    for (int s = 0; s < 12; ++s) {
      w0.write_tensor("x", s + 1, Mode::kTrain, s + 1, view_of(a, {16}));  // before commit s
      w0.write_tensor("y", s, Mode::kTrain, s, view_of(b, {4, 4}), /*stats_only=*/s % 3 == 0);
      for (const char* n : {"w0", "w1", "w2"})  // so that one tensor is a small part of a shard
        w0.write_tensor(n, s, Mode::kTrain, s, view_of(a, {2, 8}), /*stats_only=*/true);
      w0.commit_step(s, Mode::kTrain, s);
      w1.write_tensor("x", s, Mode::kTrain, s, view_of(a, {4, 4}));
      if (s % 2) w1.write_tensor("z", s, Mode::kEval, s, view_of(b, {16}));
      w1.commit_step(s, s % 2 ? Mode::kEval : Mode::kTrain, s);
    }
    w0.commit_step(12, Mode::kTrain, 12);
    w0.write_tensor("never", 13, Mode::kTrain, 13, view_of(a, {16}));  // never committed
    w0.close();
    w1.close();
  }
  {
    StreamWriter w0(dir, 0, o);
    for (int s : {5, 6, 7, 2, 15, 14}) {
      w0.write_tensor("x", s, Mode::kTrain, s, view_of(b, {16}));
      w0.commit_step(s, Mode::kTrain, s);
    }
    w0.close();
  }
  // Rank 1's restarted writer rewrites step 3 first: when its shard is still open, a lazy
  // reader loads the older, sealed record of step 3 after this one, and must keep this one.
  auto w1 = std::make_unique<StreamWriter>(dir, 1, o);
  for (int s : {3, 12, 13, 14}) {
    w1->write_tensor("x", s, Mode::kTrain, s, view_of(b, {4, 4}));
    w1->commit_step(s, Mode::kTrain, s);
  }
  if (!live) {
    w1->close();
    return nullptr;
  }
  w1->flush();
  return w1;
}

using Key = std::tuple<std::string, uint32_t, int64_t>;  // name, rank, step
struct Seen {
  std::string shard;
  uint64_t frame_offset;
  double mean;
  uint64_t numel;
  uint16_t flags;
  int mode;
  std::vector<int64_t> shape;
  bool operator==(const Seen& o) const {
    return shard == o.shard && frame_offset == o.frame_offset && mean == o.mean &&
           numel == o.numel && flags == o.flags && mode == o.mode && shape == o.shape;
  }
};

std::map<Key, Seen> everything(const RunReader& r, const std::vector<std::size_t>& rows) {
  std::map<Key, Seen> out;
  for (std::size_t i : rows) {
    RecordInfo rec = r.record(i);
    Key k{r.names()[rec.name_id], rec.rank, rec.step};
    EXPECT_EQ(out.count(k), 0u) << "duplicate record";
    out[k] = Seen{r.shard_path(rec.shard), rec.frame_offset, rec.stats.mean, rec.stats.numel,
                  rec.flags, static_cast<int>(rec.mode), rec.shape};
  }
  return out;
}

std::vector<std::size_t> all_rows(const RunReader& r) {
  std::vector<std::size_t> v(r.num_records());
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = i;
  return v;
}

void expect_same_commits(const RunReader& a, const RunReader& b) {
  ASSERT_EQ(a.commits().size(), b.commits().size());
  for (std::size_t i = 0; i < a.commits().size(); ++i) {
    const auto &x = a.commits()[i], &y = b.commits()[i];
    EXPECT_EQ(std::tie(x.rank, x.step, x.mode_step, x.num_tensors), std::tie(y.rank, y.step, y.mode_step, y.num_tensors)) << i;
    EXPECT_EQ(x.mode, y.mode);
    EXPECT_EQ(x.wall_time, y.wall_time);
  }
}

std::vector<std::string> files_with(const std::string& dir, const std::string& ext) {
  std::vector<std::string> out;
  for (const auto& rank : fs::directory_iterator(dir))
    if (rank.is_directory())
      for (const auto& f : fs::directory_iterator(rank.path()))
        if (f.path().extension() == ext) out.push_back(f.path().string());
  std::sort(out.begin(), out.end());
  return out;
}

/// The table a shard's own INDEX frame gives.
TensorTable table_from_shard(const std::string& shard, uint32_t rank, uint32_t seq) {
  auto bytes = tvtest::read_file(shard);
  uint64_t ioff, ilen;
  uint32_t n;
  EXPECT_TRUE(decode_footer(bytes.data() + bytes.size() - kFooterSize, &ioff, &ilen, &n));
  FrameHeader h;
  EXPECT_TRUE(decode_frame_header(bytes.data() + ioff, &h));
  return build_tensor_table(rank, seq, bytes.size(), h.meta_crc, bytes.data() + ioff + kFrameHeaderSize,
                            h.meta_len, shard);
}

}  // namespace

TEST(TensorIndex, WriterWritesTheTableOfEachSealedShard) {
  tvtest::TempDir dir;
  write_scenario(dir.path(), false);
  auto shards = files_with(dir.path(), ".tvs");
  auto indexes = files_with(dir.path(), ".tvt");
  ASSERT_GT(shards.size(), 6u);
  ASSERT_EQ(indexes.size(), shards.size());  // every shard is sealed: each has its index
  for (const std::string& s : shards) {
    const uint32_t rank = static_cast<uint32_t>(std::stoul(fs::path(s).parent_path().filename().string().substr(5)));
    const uint32_t seq = static_cast<uint32_t>(std::stoul(fs::path(s).filename().string().substr(6, 8)));
    TensorTable want = table_from_shard(s, rank, seq);
    const std::string t = tensor_index_path(s);
    // Byte for byte what the shard's own index gives, and it decodes back to the same table.
    EXPECT_EQ(tvtest::read_file(t), encode_tensor_index(want)) << t;
    TensorTable got = read_tensor_index(t);
    EXPECT_EQ(encode_tensor_index(got), encode_tensor_index(want));
    EXPECT_EQ(got.names, want.names);
    EXPECT_EQ(got.commits.size(), want.commits.size());
  }
  // The frames of step 13 were never committed: no record of "never" anywhere.
  for (const std::string& t : indexes) {
    TensorTable got = read_tensor_index(t);
    for (std::size_t k = 0; k < got.names.size(); ++k)
      if (got.names[k] == "never") {
        EXPECT_TRUE(got.records[k].empty());
      }
  }
}

TEST(TensorIndex, LazyReaderSeesWhatAnEagerReaderSees) {
  for (bool live : {false, true}) {
    tvtest::TempDir dir;
    auto writer = write_scenario(dir.path(), live);
    RunReader eager(dir.path(), true, false);
    RunReader lazy(dir.path(), true, true);
    EXPECT_TRUE(lazy.problems().empty());
    expect_same_commits(eager, lazy);
    EXPECT_EQ(eager.names(), lazy.names());
    for (uint32_t r : {0u, 1u}) EXPECT_EQ(eager.ended(r), lazy.ended(r)) << r;
    EXPECT_EQ(lazy.ended(1), !live);
    // Before any load, a lazy reader holds only the records of unsealed shards.
    EXPECT_GT(lazy.num_deferred_records(), 0u);
    EXPECT_EQ(lazy.num_records() + lazy.num_deferred_records() >= eager.num_records(), true);
    const uint32_t z = static_cast<uint32_t>(lazy.name_id("z"));
    const uint32_t y = static_cast<uint32_t>(lazy.name_id("y"));
    EXPECT_FALSE(lazy.loaded({y}, {0}));
    const std::size_t before = lazy.num_deferred_records();
    lazy.load({y}, {1});  // rank 1 has no y: nothing to load
    EXPECT_EQ(lazy.num_deferred_records(), before);
    EXPECT_TRUE(lazy.loaded({y}, {1}));
    EXPECT_FALSE(lazy.loaded({y}, {0}));
    EXPECT_FALSE(lazy.loaded({z}));
    lazy.load({z}, {1});
    EXPECT_TRUE(lazy.loaded({z}));  // z is rank 1's only
    EXPECT_FALSE(lazy.loaded({}));
    Selection zsel;
    zsel.name_ids = {z};
    Selection ezsel;
    ezsel.name_ids = {static_cast<uint32_t>(eager.name_id("z"))};
    EXPECT_EQ(everything(lazy, lazy.select(zsel)), everything(eager, eager.select(ezsel)));
    for (const auto& row : lazy.rows()) EXPECT_TRUE(row.name_id == z || row.rank == 1) << "only z loaded";
    {
      // A step range over what is loaded so far (spans are rebuilt only once all is loaded).
      Selection range;
      range.step_min = 3;
      range.step_max = 7;
      std::vector<std::size_t> want;
      for (std::size_t i = 0; i < lazy.num_records(); ++i)
        if (lazy.row(i).step >= 3 && lazy.row(i).step <= 7) want.push_back(i);
      EXPECT_FALSE(want.empty());
      EXPECT_EQ(lazy.select(range), want);
    }
    lazy.load({});
    EXPECT_TRUE(lazy.loaded({}));
    EXPECT_EQ(lazy.num_deferred_records(), 0u);
    EXPECT_EQ(lazy.num_records(), eager.num_records());
    EXPECT_EQ(everything(lazy, all_rows(lazy)), everything(eager, all_rows(eager)));
    // Every step range and filter selects the same records.
    for (int64_t lo = -1; lo <= 15; lo += 2)
      for (int64_t hi = lo; hi <= 16; hi += 3)
        for (int mode : {-1, 0, 1}) {
          Selection sel;
          sel.step_min = lo;
          sel.step_max = hi;
          sel.mode = mode;
          if (lo == 3) sel.ranks = {1};
          EXPECT_EQ(everything(lazy, lazy.select(sel)), everything(eager, eager.select(sel)))
              << lo << ".." << hi << " mode " << mode;
          // Table order, and each step's records together.
          auto rows = lazy.select(sel);
          EXPECT_TRUE(std::is_sorted(rows.begin(), rows.end()));
        }
    // Values decode the same (the rewrite of step 6 on rank 0 wins in both).
    const uint32_t x = static_cast<uint32_t>(lazy.name_id("x"));
    std::vector<float> va(16), vb(16);
    lazy.read_value(*lazy.find(x, 6, 0), va.data());
    eager.read_value(*eager.find(static_cast<uint32_t>(eager.name_id("x")), 6, 0), vb.data());
    EXPECT_EQ(va, vb);
    EXPECT_EQ(va, tvtest::random_floats(16, 2));
    lazy.read_value(*lazy.find(x, 3, 1), va.data());
    EXPECT_EQ(va, tvtest::random_floats(16, 2));
    if (writer) {
      // The live writer seals its shard: a refresh defers it, a load brings its records.
      writer->close();
      eager.refresh();
      lazy.refresh();
      lazy.load({});
      expect_same_commits(eager, lazy);
      EXPECT_TRUE(lazy.ended(1));
      EXPECT_EQ(everything(lazy, all_rows(lazy)), everything(eager, all_rows(eager)));
    }
  }
}

namespace {

/// Compares a lazy reader of a run whose tensor indexes were tampered with to an eager one;
/// returns the lazy reader's problems.
std::vector<std::string> read_tampered(const std::string& dir) {
  RunReader eager(dir, true, false);
  RunReader lazy(dir, true, true);
  // One tensor at a time: each is a small part of its shards, so its blocks are read (a load
  // of most of a shard goes through the shard's own index instead).
  for (uint32_t id = 0; id < lazy.names().size(); ++id) lazy.load({id});
  EXPECT_TRUE(lazy.loaded({}));
  expect_same_commits(eager, lazy);
  EXPECT_EQ(everything(lazy, all_rows(lazy)), everything(eager, all_rows(eager)));
  return lazy.problems();
}

void flip(const std::string& path, std::size_t at) {
  auto b = tvtest::read_file(path);
  ASSERT_LT(at, b.size());
  b[at] ^= 0x10;
  tvtest::write_file(path, b);
}

}  // namespace

TEST(TensorIndex, DamagedStaleOrForgedIndexesAreNotTrusted) {
  tvtest::TempDir dir;
  write_scenario(dir.path(), false);
  auto idx = files_with(dir.path(), ".tvt");
  ASSERT_GE(idx.size(), 6u);
  EXPECT_TRUE(read_tampered(dir.path()).empty());
  // A flipped byte in a block (found when the block is loaded), in the directory, in the
  // header; a truncated file; another shard's index (stale); an empty file.
  flip(idx[0], tvtest::read_file(idx[0]).size() - 20);
  flip(idx[1], kTensorIndexHeaderSize + 3);
  flip(idx[2], 17);
  {
    auto b = tvtest::read_file(idx[3]);
    b.resize(b.size() / 2);
    tvtest::write_file(idx[3], b);
  }
  fs::copy_file(idx[5], idx[4], fs::copy_options::overwrite_existing);
  tvtest::write_file(idx[5], {});
  auto problems = read_tampered(dir.path());
  EXPECT_EQ(problems.size(), 6u);
  for (const auto& p : problems) EXPECT_NE(p.find("read through the shard's index instead"), std::string::npos) << p;
  std::string all;
  for (const auto& p : problems) all += p + "\n";
  EXPECT_NE(all.find("checksum mismatch"), std::string::npos) << all;
  EXPECT_NE(all.find("stale"), std::string::npos) << all;
}

TEST(TensorIndex, LoadingMostOfAShardFallsBackToItsTensorIndexWhenTheShardIndexIsDamaged) {
  tvtest::TempDir dir;
  write_scenario(dir.path(), false);
  std::map<Key, Seen> want;
  {
    RunReader eager(dir.path(), true, false);
    want = everything(eager, all_rows(eager));
  }
  const std::string shard = files_with(dir.path(), ".tvs")[0];
  auto bytes = tvtest::read_file(shard);
  uint64_t ioff, ilen;
  uint32_t n;
  ASSERT_TRUE(decode_footer(bytes.data() + bytes.size() - kFooterSize, &ioff, &ilen, &n));
  bytes[ioff + kFrameHeaderSize + 60] ^= 0x01;  // inside the INDEX frame's meta
  tvtest::write_file(shard, bytes);
  EXPECT_THROW(RunReader(dir.path(), true, false), Error);  // an eager strict reader refuses it
  RunReader lazy(dir.path(), true, true);
  lazy.load({});
  EXPECT_EQ(everything(lazy, all_rows(lazy)), want);
  ASSERT_EQ(lazy.problems().size(), 1u);
  EXPECT_NE(lazy.problems()[0].find("read through its tensor index instead"), std::string::npos);
}

TEST(TensorIndex, RecordsThatPassTheirChecksumsAreStillValidated) {
  // Forged tables, re-encoded with valid checksums: every field a reader relies on is checked.
  struct Forge {
    const char* what;
    void (*edit)(TensorTable&);
  };
  const Forge forges[] = {
      {"codec", [](TensorTable& t) { t.records[0][0].codec = static_cast<Codec>(9); }},
      {"commit", [](TensorTable& t) { t.records[0][0].commit = 999; }},
      {"step", [](TensorTable& t) { t.records[0][0].step += 1; }},
      {"shape", [](TensorTable& t) { t.records[0][0].shape = 77; }},
      {"bytes", [](TensorTable& t) { t.records[0][0].raw_nbytes += 4; }},
      {"offset", [](TensorTable& t) { t.records[0][0].frame_offset = t.shard_size; }},
      {"counts", [](TensorTable& t) { t.records[0][0].stats.nan = t.records[0][0].stats.numel + 1; }},
      {"flags", [](TensorTable& t) { t.records[0][0].flags = 0x80; }},
      {"mode", [](TensorTable& t) { t.commits[0].mode = static_cast<Mode>(7); }},
  };
  for (const Forge& f : forges) {
    tvtest::TempDir dir;
    write_scenario(dir.path(), false);
    const std::string t = files_with(dir.path(), ".tvt")[0];
    TensorTable table = read_tensor_index(t);
    ASSERT_FALSE(table.records.empty() || table.records[0].empty());
    f.edit(table);
    tvtest::write_file(t, encode_tensor_index(table));
    EXPECT_THROW(read_tensor_index(t), Error) << f.what;
    auto problems = read_tampered(dir.path());
    EXPECT_EQ(problems.size(), 1u) << f.what;
  }
}

TEST(TensorIndex, WriterOptionTurnsItOffAndReadersDoNotNeedIt) {
  tvtest::TempDir dir;
  auto a = tvtest::random_floats(8, 1);
  WriterOptions o;
  o.tensor_index = false;
  {
    StreamWriter w(dir.path(), 0, o);
    for (int s = 0; s < 3; ++s) {
      w.write_tensor("x", s, Mode::kTrain, s, view_of(a, {8}));
      w.commit_step(s, Mode::kTrain, s);
    }
    w.close();
  }
  EXPECT_TRUE(files_with(dir.path(), ".tvt").empty());
  RunReader lazy(dir.path(), true, true);
  EXPECT_EQ(lazy.num_deferred_records(), 0u);
  EXPECT_EQ(lazy.num_records(), 3u);
  EXPECT_TRUE(lazy.problems().empty());
}
