#pragma once
// Shared helpers of the C++ tests: temporary directories and file byte edits.
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "tensorvigil/tensor_view.h"

namespace tvtest {

/// A fresh directory under the system temp dir, removed when the object dies.
class TempDir {
 public:
  TempDir() {
    static std::mt19937_64 rng(std::random_device{}());
    path_ = (std::filesystem::temp_directory_path() /
             ("tvtest-" + std::to_string(::getpid()) + "-" + std::to_string(rng())))
                .string();
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

inline std::vector<uint8_t> read_file(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

inline void write_file(const std::string& p, const std::vector<uint8_t>& b) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

inline std::vector<float> random_floats(std::size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, 0.02f);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

/// A float32 view of `v` with `shape` (the caller keeps `v` alive).
inline tensorvigil::TensorView float_view(const std::vector<float>& v, std::vector<int64_t> shape) {
  tensorvigil::TensorView t;
  t.data = v.data();
  t.dtype = tensorvigil::DType::kFloat32;
  t.shape = std::move(shape);
  return t;
}

}  // namespace tvtest
