// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief A small fixed thread pool with a blocking parallel_for (the caller works too).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "kvq/core/bits.hpp"
#include "kvq/core/error.hpp"

namespace kvq {

/// `threads` workers in all: threads - 1 pool threads plus the thread that calls parallel_for.
/// Threads are started once by the constructor; parallel_for allocates nothing.
class ThreadPool {
 public:
  explicit ThreadPool(int threads) {
    if (threads < 1) detail::throw_argument_error("kvq::ThreadPool", "threads", threads, "threads >= 1");
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { work(); });
  }
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (std::thread& t : workers_) t.join();
  }

  int size() const noexcept { return static_cast<int>(workers_.size()) + 1; }

  /// Calls f(i) for every i in [0, n) on the pool's threads and returns when all are done.
  /// f must not throw. Calls from several threads at once are serialized.
  void parallel_for(index_t n, const std::function<void(index_t)>& f) {
    if (n <= 0) return;
    if (workers_.empty() || n == 1) {
      for (index_t i = 0; i < n; ++i) f(i);
      return;
    }
    std::lock_guard<std::mutex> serial(call_mutex_);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &f;
      job_size_ = n;
      next_.store(0);
      pending_ = static_cast<int>(workers_.size());
      ++generation_;
    }
    wake_.notify_all();
    run_items();
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_ == 0; });
    job_ = nullptr;
  }

 private:
  void run_items() {
    for (index_t i = next_.fetch_add(1); i < job_size_; i = next_.fetch_add(1)) (*job_)(i);
  }
  void work() {
    std::uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
      }
      run_items();
      {
        std::lock_guard<std::mutex> lock(mutex_);
        if (--pending_ == 0) done_.notify_one();
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex call_mutex_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  const std::function<void(index_t)>* job_ = nullptr;
  index_t job_size_ = 0;
  std::atomic<index_t> next_{0};
  int pending_ = 0;
  std::uint64_t generation_ = 0;
  bool stop_ = false;
};

}  // namespace kvq
