#include "tensorvigil/internal/thread_pool.h"

#include <atomic>
#include <exception>
#include <memory>
#include <new>

#include <pthread.h>

namespace tensorvigil::internal {

namespace {
thread_local bool tl_in_pool_task = false;
std::mutex g_pool_mu;
std::unique_ptr<ThreadPool> g_pool;
// Pools replaced by set_global_threads stay alive: a caller may still hold a reference.
std::vector<std::unique_ptr<ThreadPool>> g_retired;
int g_pool_threads = 0;

int default_threads() {
  unsigned hw = std::thread::hardware_concurrency();
  if (hw == 0) hw = 2;
  return static_cast<int>(hw < 8 ? hw : 8);
}
}  // namespace

struct ThreadPool::Job {
  std::size_t n = 0;
  const std::function<void(std::size_t)>* fn = nullptr;
  std::atomic<std::size_t> next{0};
  std::atomic<int> active{0};
  int max_helpers = 0;
  std::atomic<int> helpers{0};
  std::exception_ptr error;
  std::mutex err_mu;
  std::mutex done_mu;
  std::condition_variable done_cv;

  void run() {
    tl_in_pool_task = true;
    for (;;) {
      std::size_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n) break;
      try {
        (*fn)(i);
      } catch (...) {
        std::lock_guard<std::mutex> lk(err_mu);
        if (!error) error = std::current_exception();
        next.store(n, std::memory_order_relaxed);
      }
    }
    tl_in_pool_task = false;
  }
};

ThreadPool::ThreadPool(int threads) {
  if (threads < 1) threads = 1;
  for (int i = 0; i < threads - 1; ++i) workers_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::worker_loop() {
  uint64_t seen = 0;
  for (;;) {
    Job* job;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return stop_ || (job_ != nullptr && generation_ != seen); });
      if (stop_) return;
      seen = generation_;
      job = job_;
      if (job->helpers.fetch_add(1) >= job->max_helpers) continue;
      job->active.fetch_add(1);
    }
    job->run();
    {
      // Decrement under done_mu so the owner cannot destroy the job between the two steps.
      std::lock_guard<std::mutex> lk(job->done_mu);
      if (job->active.fetch_sub(1) == 1) job->done_cv.notify_all();
    }
  }
}

void ThreadPool::parallel_for(std::size_t n, const std::function<void(std::size_t)>& fn,
                              int max_threads) {
  if (n == 0) return;
  int threads = max_threads <= 0 ? size() : (max_threads < size() ? max_threads : size());
  if (n == 1 || threads <= 1 || workers_.empty() || tl_in_pool_task) {
    for (std::size_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::lock_guard<std::mutex> run_lk(run_mu_);
  Job job;
  job.n = n;
  job.fn = &fn;
  job.max_helpers = threads - 1;
  {
    std::lock_guard<std::mutex> lk(mu_);
    job_ = &job;
    ++generation_;
  }
  cv_.notify_all();
  job.run();
  {
    // Stop new helpers from joining, then wait for the ones that did.
    std::lock_guard<std::mutex> lk(mu_);
    job_ = nullptr;
  }
  {
    std::unique_lock<std::mutex> lk(job.done_mu);
    job.done_cv.wait(lk, [&] { return job.active.load() == 0; });
  }
  if (job.error) std::rethrow_exception(job.error);
}

namespace {
// After fork() only the forking thread exists in the child: the pools' workers are gone (and
// a lock may have been held by one of them). The child forgets the pools without destroying
// them (their destructors would join threads that do not exist) and builds a new one on use.
void forget_pools_in_child() {
  new (&g_pool_mu) std::mutex();
  (void)g_pool.release();
  for (auto& p : g_retired) (void)p.release();
  g_retired.clear();
}
}  // namespace

ThreadPool& ThreadPool::global() {
  static const bool registered = [] {
    ::pthread_atfork(nullptr, nullptr, forget_pools_in_child);
    return true;
  }();
  (void)registered;
  std::lock_guard<std::mutex> lk(g_pool_mu);
  if (!g_pool) {
    if (g_pool_threads <= 0) g_pool_threads = default_threads();
    g_pool = std::make_unique<ThreadPool>(g_pool_threads);
  }
  return *g_pool;
}

void ThreadPool::set_global_threads(int threads) {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  g_pool_threads = threads <= 0 ? default_threads() : threads;
  // Same size: keep the pool (retired pools keep their threads for the process lifetime).
  if (g_pool && g_pool->size() == g_pool_threads) return;
  if (g_pool) g_retired.push_back(std::move(g_pool));
}

int ThreadPool::global_threads() {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  return g_pool_threads <= 0 ? default_threads() : g_pool_threads;
}

}  // namespace tensorvigil::internal
