#pragma once
/// \file internal/thread_pool.h
/// A small persistent worker pool for data-parallel loops (statistics, compression).
#include <condition_variable>
#include <cstddef>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace tensorvigil::internal {

/// Fixed-size pool. `parallel_for` splits [0, n) into tasks run by the pool threads and the
/// calling thread; it returns when all are done. Exceptions from tasks are rethrown (first one).
/// Nested calls from inside a task run serially on that thread (no deadlock).
class ThreadPool {
 public:
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  /// Number of threads that work on a loop, the caller included.
  int size() const { return static_cast<int>(workers_.size()) + 1; }

  /// Runs fn(i) for every i in [0, n), using at most `max_threads` threads (0: all).
  void parallel_for(std::size_t n, const std::function<void(std::size_t)>& fn,
                    int max_threads = 0);

  /// Process-wide pool, created on first use with `threads` (0: min(hardware, 8)).
  static ThreadPool& global();
  /// Replaces the global pool's size (waits for running loops).
  static void set_global_threads(int threads);
  static int global_threads();

 private:
  struct Job;
  void worker_loop();

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_;
  Job* job_ = nullptr;
  uint64_t generation_ = 0;
  bool stop_ = false;
  std::mutex run_mu_;  // one loop at a time
};

}  // namespace tensorvigil::internal
