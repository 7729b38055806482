// libFuzzer target: one fuzz input is one shard file (rank-00000/shard-00000000.tvs of a
// scratch run), read through the public reader exactly as `tv.open` does (strict and
// non-strict: records, histograms, every value) and through fsck's checker.
//
// An input is one control byte followed by the shard's bytes. Random mutations almost never
// keep 9 layers of CRC-32C valid, so, unless the control byte is odd, the harness first repairs every checksum it can locate (shard header, frame
// headers, metas, chunk tables and chunks, index entries, footer). The other half of the
// inputs reach the parsers with their checksums as mutated. Only tensorvigil::Error may
// escape a parser: anything else (a crash, a sanitizer report, std::bad_alloc, a hang) is a
// finding. Build and run: tools/fuzz.sh.
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "tensorvigil/error.h"
#include "tensorvigil/store/crc32c.h"
#include "tensorvigil/store/format.h"
#include "tensorvigil/store/fsck.h"
#include "tensorvigil/store/run_reader.h"

using namespace tensorvigil;
using namespace tensorvigil::store;

namespace {

// Values larger than this are not decoded: the declared size is checksummed metadata that a
// reader must trust to allocate (see docs/RELIABILITY.md "Declared sizes"); the container
// checks that bound it are exercised by smaller values.
constexpr uint64_t kMaxValueBytes = 16u << 20;

uint32_t rd32(const uint8_t* p) { uint32_t v; std::memcpy(&v, p, 4); return v; }
uint64_t rd64(const uint8_t* p) { uint64_t v; std::memcpy(&v, p, 8); return v; }
void wr32(uint8_t* p, uint32_t v) { std::memcpy(p, &v, 4); }

void fix_header_crc(uint8_t* h) { wr32(h + 28, crc32c(h, 28)); }

void fix_payload(uint8_t* p, uint64_t len, uint8_t* hdr) {
  if (len < 8) return;
  uint64_t n = rd32(p + 4);
  uint64_t table = 8 + 8 * n;
  if (table > len) return;
  wr32(hdr + 24, crc32c(p, table));
  uint64_t pos = table;
  for (uint64_t i = 0; i < n; ++i) {
    uint32_t sl = rd32(p + 8 + 8 * i);
    if (sl > len - pos) return;
    wr32(p + 12 + 8 * i, crc32c(p + pos, sl));
    pos += sl;
  }
}

void fix_index(uint8_t* m, uint64_t n) {
  if (n < 4) return;
  uint32_t count = rd32(m);
  uint64_t pos = 4;
  for (uint32_t i = 0; i < count && n - pos >= 40; ++i) {
    uint8_t* h = m + pos + 8;
    uint32_t ml = rd32(h + 8);
    if (ml > n - pos - 40) return;
    wr32(h + 12, crc32c(m + pos + 40, ml));
    fix_header_crc(h);
    pos += 40 + ml;
  }
}

void fix_checksums(std::vector<uint8_t>& b) {
  const uint64_t size = b.size();
  if (size < kShardHeaderSize) return;
  fix_header_crc(b.data());
  uint64_t pos = kShardHeaderSize;
  while (size - pos >= kFrameHeaderSize) {
    uint8_t* h = b.data() + pos;
    if (rd32(h) != kFrameMagic) break;
    uint64_t ml = rd32(h + 8), pl = rd64(h + 16);
    if (ml > size - pos - kFrameHeaderSize) break;
    uint8_t* meta = h + kFrameHeaderSize;
    if (h[4] == static_cast<uint8_t>(FrameKind::kIndex)) fix_index(meta, ml);
    wr32(h + 12, crc32c(meta, ml));
    if (pl <= size - pos - kFrameHeaderSize - ml) fix_payload(meta + ml, pl, h);
    fix_header_crc(h);
    if (pl > size - pos - kFrameHeaderSize - ml) break;
    pos += kFrameHeaderSize + ml + pl;
  }
  if (size >= kShardHeaderSize + kFooterSize) {
    uint8_t* f = b.data() + size - kFooterSize;
    if (std::memcmp(f, "TVFOOTER", 8) == 0) fix_header_crc(f);
  }
}

std::string g_scratch;

std::string scratch_dir() {
  const char* base = std::getenv("TV_FUZZ_TMP");
  g_scratch = std::string(base ? base : "/dev/shm") + "/tv-fuzz-" + std::to_string(::getpid());
  ::mkdir(g_scratch.c_str(), 0755);
  ::mkdir((g_scratch + "/rank-00000").c_str(), 0755);
  std::atexit([] {
    std::error_code ec;
    std::filesystem::remove_all(g_scratch, ec);
  });
  return g_scratch;
}

void read_everything(const std::string& dir, bool strict) {
  try {
    RunReader r(dir, strict);
    (void)r.problems();
    (void)r.commits();
    for (std::size_t i = 0; i < r.num_records(); ++i) {
      RecordInfo rec = r.record(i);
      try {
        r.load_histograms(rec);
      } catch (const Error&) {
      }
      if (!rec.has_value() || rec.raw_nbytes > kMaxValueBytes) continue;
      std::vector<uint8_t> out(rec.raw_nbytes);
      try {
        r.read_value(rec, out.data());
      } catch (const Error&) {
      }
    }
    r.refresh();
  } catch (const Error&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  static const std::string dir = scratch_dir();
  static const std::string shard = dir + "/rank-00000/shard-00000000.tvs";
  if (size == 0) return 0;
  std::vector<uint8_t> b(data + 1, data + size);
  if ((data[0] & 1) == 0) fix_checksums(b);
  FILE* f = std::fopen(shard.c_str(), "wb");
  if (!f) std::abort();
  if (!b.empty() && std::fwrite(b.data(), 1, b.size(), f) != b.size()) std::abort();
  std::fclose(f);
  read_everything(dir, true);
  read_everything(dir, false);
  try {
    (void)check_shard(shard, 0, 0, true);
  } catch (const Error&) {
  }
  return 0;
}
