// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief RankBoard: what the processes of one sharded run on one node share besides NCCL: the
///        NCCL unique id (the bootstrap), each rank's pid, barriers, and the run's first failure
///        (rank and message), in a POSIX shared-memory segment; fork_ranks starts such a run.
///        Host only (POSIX), no CUDA: its logic is tested on machines without a GPU.
///
/// Why: NCCL does not tell a rank that a peer failed. A rank whose peer threw before a
/// collective, or exited, waits in ncclCommInitRank or in its stream forever. Every wait of a
/// sharded run (the bootstrap, barriers, cuda/head_comm.cuh's synchronize) therefore polls the
/// board: a failure posted by any rank, a peer process that is gone (no such pid, or a zombie),
/// or the board's timeout ends the wait with kvq::Error(kRankFailure) that names the rank and
/// its message, on every rank. The first failure posted wins; later ones are dropped.
///
/// Layout: one segment /<name> of sizeof(RankBoardSegment) bytes (shm_open + mmap), written by
/// lock-free std::atomic (address-free for these sizes on Linux), at most kMaxRanks ranks.
/// Lifetime: RankBoard::create makes the segment (O_EXCL) and unlinks its name when destroyed;
/// RankBoard::open maps an existing one (waiting up to the timeout for its creator). A process
/// forked after create inherits the mapping: fork_ranks passes the board to its children.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "kvq/core/error.hpp"
#include "kvq/core/status.hpp"

namespace kvq {
namespace cuda {

inline constexpr int kMaxRanks = 64;

/// The shared segment (plain data in shared memory; see the file comment).
struct RankBoardSegment {
  static constexpr std::uint32_t kMagic = 0x6b767142u;  // "Bqvk"
  std::atomic<std::uint32_t> magic;                      ///< kMagic once the creator initialised it
  std::int32_t world_size;
  std::atomic<std::int32_t> id_ready;                    ///< 1 once id holds the unique id
  unsigned char id[128];                                 ///< the NCCL unique id (ncclUniqueId is 128 bytes)
  std::atomic<std::int32_t> pid[kMaxRanks];              ///< 0 until the rank joins
  std::atomic<std::int32_t> finished[kMaxRanks];         ///< 1 once the rank ended without error
  std::atomic<std::int64_t> arrivals[kMaxRanks];         ///< barriers each rank entered
  std::atomic<std::int32_t> claim;                       ///< -1, or the rank writing the failure
  std::atomic<std::int32_t> failed_rank;                 ///< -1, or the first rank that posted a failure
  char message[1024];                                    ///< its message, NUL-terminated
};
static_assert(std::atomic<std::int64_t>::is_always_lock_free && std::atomic<std::int32_t>::is_always_lock_free,
              "kvq: RankBoard needs lock-free atomics (shared between processes)");

/// A failure of a sharded run as the board holds it.
struct RankFailure {
  std::int32_t rank = -1;  ///< -1: none
  std::string message;
};

class RankBoard {
 public:
  using clock = std::chrono::steady_clock;

  /// Makes the segment /name for world_size ranks (1 .. kMaxRanks). Throws kvq::Error:
  /// kInvalidArgument (name, world_size), kIoError when it exists or cannot be made.
  static RankBoard create(const std::string& name, int world_size, std::chrono::milliseconds timeout = std::chrono::seconds(120)) {
    constexpr const char* where = "kvq::cuda::RankBoard::create";
    check_name(where, name);
    if (world_size < 1 || world_size > kMaxRanks) {
      kvq::detail::throw_argument_error(where, "world_size", world_size, kvq::detail::concat("1 .. ", kMaxRanks));
    }
    const std::string path = "/" + name;
    const int fd = shm_open(path.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0) throw_io(where, "shm_open(O_CREAT | O_EXCL) of " + path);
    if (ftruncate(fd, sizeof(RankBoardSegment)) != 0) {
      const int err = errno;
      close(fd);
      shm_unlink(path.c_str());
      errno = err;
      throw_io(where, "ftruncate of " + path);
    }
    RankBoard b(map(where, fd, path), path, true, timeout);
    RankBoardSegment* s = b.seg_;
    s->world_size = world_size;
    s->id_ready.store(0);
    std::memset(s->id, 0, sizeof(s->id));
    for (int r = 0; r < kMaxRanks; ++r) {
      s->pid[r].store(0);
      s->finished[r].store(0);
      s->arrivals[r].store(0);
    }
    s->claim.store(-1);
    s->failed_rank.store(-1);
    s->message[0] = '\0';
    s->magic.store(RankBoardSegment::kMagic, std::memory_order_release);
    return b;
  }

  /// Maps the segment /name that another process creates, waiting up to `timeout` for it.
  static RankBoard open(const std::string& name, std::chrono::milliseconds timeout = std::chrono::seconds(120)) {
    constexpr const char* where = "kvq::cuda::RankBoard::open";
    check_name(where, name);
    const std::string path = "/" + name;
    const auto deadline = clock::now() + timeout;
    for (;;) {
      const int fd = shm_open(path.c_str(), O_RDWR, 0600);
      if (fd >= 0) {
        struct stat st {};
        if (fstat(fd, &st) == 0 && static_cast<std::size_t>(st.st_size) >= sizeof(RankBoardSegment)) {
          RankBoard b(map(where, fd, path), path, false, timeout);
          if (b.seg_->magic.load(std::memory_order_acquire) == RankBoardSegment::kMagic) return b;
        } else {
          close(fd);
        }
      } else if (errno != ENOENT) {
        throw_io(where, "shm_open of " + path);
      }
      if (clock::now() > deadline) {
        throw Error(Status::kRankFailure, kvq::detail::concat(where, ": no board ", path, " after ", timeout.count(), " ms"));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }

  RankBoard(RankBoard&& o) noexcept
      : seg_(std::exchange(o.seg_, nullptr)), path_(std::move(o.path_)), owner_(std::exchange(o.owner_, false)),
        timeout_(o.timeout_) {}
  RankBoard& operator=(RankBoard&& o) noexcept {
    if (this != &o) {
      release();
      seg_ = std::exchange(o.seg_, nullptr);
      path_ = std::move(o.path_);
      owner_ = std::exchange(o.owner_, false);
      timeout_ = o.timeout_;
    }
    return *this;
  }
  RankBoard(const RankBoard&) = delete;
  RankBoard& operator=(const RankBoard&) = delete;
  ~RankBoard() { release(); }

  int world_size() const noexcept { return seg_->world_size; }
  std::chrono::milliseconds timeout() const noexcept { return timeout_; }
  const std::string& name() const noexcept { return path_; }

  /// Records this process as `rank` (kInvalidArgument for a rank outside 0 .. world_size - 1 or
  /// one that another live process holds).
  void join(int rank) {
    constexpr const char* where = "kvq::cuda::RankBoard::join";
    check_rank(where, rank);
    const std::int32_t self = static_cast<std::int32_t>(getpid());
    std::int32_t held = seg_->pid[rank].load();
    if (held != 0 && held != self && process_alive(held)) {
      kvq::detail::throw_argument_error(where, "rank", rank, kvq::detail::concat("a rank no live process holds (pid ", held, " holds it)"));
    }
    record(rank, self);
  }
  /// What join does for another process: pid holds `rank` (fork_ranks records its children).
  void record(int rank, std::int32_t pid) {
    check_rank("kvq::cuda::RankBoard::record", rank);
    seg_->pid[rank].store(pid, std::memory_order_release);
  }

  /// Posts this rank's failure (the first posted wins; a later one is dropped). Never throws.
  void fail(int rank, const std::string& message) noexcept {
    if (rank < 0 || rank >= seg_->world_size) return;
    std::int32_t none = -1;
    if (!seg_->claim.compare_exchange_strong(none, rank)) return;
    const std::size_t n = std::min(message.size(), sizeof(seg_->message) - 1);
    std::memcpy(seg_->message, message.data(), n);
    seg_->message[n] = '\0';
    seg_->failed_rank.store(rank, std::memory_order_release);
  }

  /// Marks `rank` as ended without error: its process may exit without being taken for a crash.
  void finish(int rank) {
    check_rank("kvq::cuda::RankBoard::finish", rank);
    seg_->finished[rank].store(1, std::memory_order_release);
  }

  /// The first failure posted, or the first joined peer that did not finish and whose process
  /// is gone (rank -1: none).
  /// (processes: false skips the peers' liveness, which reads /proc: the waits check it each ms.)
  RankFailure failure(int self, bool processes = true) const {
    const std::int32_t r = seg_->failed_rank.load(std::memory_order_acquire);
    if (r >= 0) return {r, std::string(seg_->message)};
    if (!processes) return {};
    for (int p = 0; p < seg_->world_size; ++p) {
      if (p == self || seg_->finished[p].load(std::memory_order_acquire) == 1) continue;
      const std::int32_t pid = seg_->pid[p].load(std::memory_order_acquire);
      if (pid != 0 && !process_alive(pid)) {
        return {p, kvq::detail::concat("the process of rank ", p, " (pid ", pid, ") exited without posting an error")};
      }
    }
    return {};
  }

  /// Throws kvq::Error(kRankFailure) naming the failure when failure(self) has one. A peer found
  /// gone is posted as that peer's failure first, so that every rank names the same first failure
  /// (not the ranks that stopped because of it and exited).
  void check(const char* where, int self, bool processes = true) {
    RankFailure f = failure(self, processes);
    if (f.rank < 0) return;
    fail(f.rank, f.message);  // dropped when one is posted already: a peer may have posted (and exited) since the read
    const RankFailure posted = failure(self, false);  // the first posted, which every rank names
    if (posted.rank >= 0) f = posted;
    throw Error(Status::kRankFailure, kvq::detail::concat(where, ": rank ", self, " stops: rank ", f.rank,
                                                          f.rank == self ? " (this rank)" : "", " failed: ", f.message));
  }

  /// Polls `done` until it is true (returns), a failure is on the board (even when done) or the timeout passes
  /// (kvq::Error(kRankFailure) naming what was awaited). `done` may throw.
  void wait(const char* where, int self, const char* what, const std::function<bool()>& done) {
    const auto start = clock::now(), deadline = start + timeout_;
    auto pause = std::chrono::microseconds(10);
    auto pids_checked = start - std::chrono::milliseconds(1);
    for (;;) {
      const auto now = clock::now();
      const bool processes = now - pids_checked >= std::chrono::milliseconds(1);
      if (processes) pids_checked = now;
      check(where, self, processes);  // first: once a rank has failed, the run is over for every wait
      if (done()) return;
      if (now > deadline) {
        throw Error(Status::kRankFailure, kvq::detail::concat(where, ": rank ", self, " waited ", timeout_.count(), " ms for ", what,
                                                              " (no rank posted an error; a peer may hang)"));
      }
      // The first 2 ms spin (a decode step's wait ends within microseconds of its stream); longer
      // waits (bootstrap, a slow peer) sleep, up to 1 ms at a time.
      if (now - start < std::chrono::milliseconds(2)) {
        std::this_thread::yield();
      } else {
        std::this_thread::sleep_for(pause);
        pause = std::min(pause * 2, std::chrono::microseconds(1000));
      }
    }
  }

  /// Every rank's barrier number n waits for all ranks' n-th arrival.
  void barrier(int rank, const char* what = "the other ranks at a barrier") {
    constexpr const char* where = "kvq::cuda::RankBoard::barrier";
    check_rank(where, rank);
    const std::int64_t n = seg_->arrivals[rank].fetch_add(1) + 1;
    wait(where, rank, what, [&] {
      for (int r = 0; r < seg_->world_size; ++r) {
        if (seg_->arrivals[r].load(std::memory_order_acquire) < n) return false;
      }
      return true;
    });
  }

  /// Rank 0 publishes the bootstrap bytes (at most 128); the others wait for them.
  void publish_id(const void* bytes, std::size_t n) {
    if (n > sizeof(seg_->id)) kvq::detail::throw_argument_error("kvq::cuda::RankBoard::publish_id", "n", n, "at most 128 bytes");
    std::memcpy(seg_->id, bytes, n);
    seg_->id_ready.store(1, std::memory_order_release);
  }
  void wait_id(int rank, void* bytes, std::size_t n) {
    wait("kvq::cuda::RankBoard::wait_id", rank, "rank 0's NCCL unique id",
         [&] { return seg_->id_ready.load(std::memory_order_acquire) == 1; });
    std::memcpy(bytes, seg_->id, std::min(n, sizeof(seg_->id)));
  }

  /// Whether pid names a live process (a zombie, exited but not reaped, is not).
  static bool process_alive(std::int32_t pid) {
    if (kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) return false;
    char path[64];
    std::snprintf(path, sizeof(path), "/proc/%d/stat", static_cast<int>(pid));
    std::FILE* f = std::fopen(path, "r");
    if (f == nullptr) return true;  // no /proc: kill's answer stands
    char buf[512];
    const std::size_t n = std::fread(buf, 1, sizeof(buf) - 1, f);
    std::fclose(f);
    buf[n] = '\0';
    const char* close_paren = std::strrchr(buf, ')');  // "pid (comm) S ..."
    return close_paren == nullptr || close_paren[1] == '\0' || close_paren[2] != 'Z';
  }

 private:
  RankBoard(RankBoardSegment* seg, std::string path, bool owner, std::chrono::milliseconds timeout)
      : seg_(seg), path_(std::move(path)), owner_(owner), timeout_(timeout) {}

  static void check_name(const char* where, const std::string& name) {
    if (name.empty() || name.size() > 200 || name.find('/') != std::string::npos) {
      kvq::detail::throw_argument_error(where, "name", name, "1 to 200 characters without '/'");
    }
  }
  void check_rank(const char* where, int rank) const {
    if (rank < 0 || rank >= seg_->world_size) {
      kvq::detail::throw_argument_error(where, "rank", rank, kvq::detail::concat("0 .. ", seg_->world_size - 1));
    }
  }
  [[noreturn]] static void throw_io(const char* where, const std::string& what) {
    throw Error(Status::kIoError, kvq::detail::concat(where, ": ", what, " failed: ", std::strerror(errno)));
  }
  static RankBoardSegment* map(const char* where, int fd, const std::string& path) {
    void* p = mmap(nullptr, sizeof(RankBoardSegment), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    const int err = errno;
    close(fd);
    if (p == MAP_FAILED) {
      errno = err;
      throw_io(where, "mmap of " + path);
    }
    return static_cast<RankBoardSegment*>(p);
  }
  void release() noexcept {
    if (seg_ == nullptr) return;
    munmap(seg_, sizeof(RankBoardSegment));
    if (owner_) shm_unlink(path_.c_str());
    seg_ = nullptr;
  }

  RankBoardSegment* seg_ = nullptr;
  std::string path_;
  bool owner_ = false;
  std::chrono::milliseconds timeout_;
};

/// Exit codes of fork_ranks' children.
inline constexpr int kRankExitOk = 0, kRankExitError = 1, kRankExitSkipped = 77;

/// Runs body(rank, board) in world_size forked processes that share a new board (a single-node
/// launcher for examples, benchmarks and tests; engines have their own). A child that throws
/// posts the error on the board (so the other ranks stop instead of hanging), prints it and
/// exits kRankExitError; otherwise it exits with body's return value, marked finished on the
/// board when that is kRankExitOk or kRankExitSkipped (any other code reads as a crash to the
/// ranks still waiting). Call it before this
/// process initialises CUDA (a forked child cannot use the parent's CUDA context). Returns the
/// children's exit codes by rank (128 + signal for a child that was killed).
inline std::vector<int> fork_ranks(const std::string& board_name, int world_size, const std::function<int(int, RankBoard&)>& body,
                                   std::chrono::milliseconds timeout = std::chrono::seconds(120)) {
  RankBoard board = RankBoard::create(board_name, world_size, timeout);
  std::vector<pid_t> pids(static_cast<std::size_t>(world_size), -1);
  std::fflush(nullptr);
  for (int r = 0; r < world_size; ++r) {
    const pid_t pid = fork();
    if (pid < 0) {
      board.fail(0, "fork failed");
      break;
    }
    if (pid == 0) {
      int code = kRankExitError;
      try {
        board.join(r);
        code = body(r, board);
        if (code == kRankExitOk || code == kRankExitSkipped) board.finish(r);
      } catch (const std::exception& e) {
        board.fail(r, e.what());
        std::fprintf(stderr, "rank %d: %s\n", r, e.what());
      } catch (...) {  // e.g. a test framework's own failure
        board.fail(r, "an exception that is not a std::exception");
        std::fprintf(stderr, "rank %d: an exception that is not a std::exception\n", r);
      }
      std::fflush(nullptr);
      _exit(code);
    }
    pids[static_cast<std::size_t>(r)] = pid;
    board.record(r, static_cast<std::int32_t>(pid));  // before the child runs far: a crash is seen
  }
  std::vector<int> codes(static_cast<std::size_t>(world_size), kRankExitError);
  for (int r = 0; r < world_size; ++r) {
    const pid_t pid = pids[static_cast<std::size_t>(r)];
    if (pid < 0) continue;
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    codes[static_cast<std::size_t>(r)] = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }
  return codes;
}

}  // namespace cuda
}  // namespace kvq
