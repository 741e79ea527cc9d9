// SPDX-License-Identifier: Apache-2.0
// RankBoard and fork_ranks (kvq/cuda/rank_board.hpp), host only: ranks in forked processes share
// the bootstrap bytes and barriers; a rank that throws, a rank that exits without a word and a
// rank that hangs each stop every other rank's wait with kRankFailure naming it, well before
// the board's timeout for the first two; bad arguments are named. The children report by exit
// code (what they saw), the parent asserts.
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "kvq/cuda/rank_board.hpp"
#include "kvq_catch.hpp"
#include "require_error.hpp"

namespace {

using kvq::Status;
using kvq::cuda::fork_ranks;
using kvq::cuda::RankBoard;
using kvq::cuda::kRankExitError;
using kvq::cuda::kRankExitOk;
using clock_type = std::chrono::steady_clock;

std::string board_name(const char* what) {
  static std::atomic<int> counter{0};
  return "kvq_test_" + std::to_string(getpid()) + "_" + what + "_" + std::to_string(counter++);
}

// Exit codes of the children that waited: what their wait ended with.
constexpr int kSawFailure = 10;  ///< kvq::Error(kRankFailure) whose message holds the expected text
constexpr int kSawOther = 11;    ///< another error, or the expected text missing
constexpr int kNoError = 12;     ///< the wait returned

/// Runs `n` barriers and returns kSawFailure when one throws kRankFailure mentioning `expect`.
int barriers_expecting(RankBoard& board, int rank, int n, const std::string& expect) {
  try {
    for (int i = 0; i < n; ++i) board.barrier(rank);
    return kNoError;
  } catch (const kvq::Error& e) {
    const std::string what = e.what();
    if (e.status() == Status::kRankFailure && what.find(expect) != std::string::npos) return kSawFailure;
    std::fprintf(stderr, "rank %d: unexpected: %s\n", rank, what.c_str());
    return kSawOther;
  }
}

}  // namespace

TEST_CASE("fork_ranks: the ranks share the bootstrap bytes and pass barriers", "[rank_board]") {
  const std::vector<int> codes = fork_ranks(board_name("ok"), 3, [](int rank, RankBoard& board) {
    unsigned char id[128];
    if (rank == 0) {
      for (int i = 0; i < 128; ++i) id[i] = static_cast<unsigned char>(i * 7 + 1);
      board.publish_id(id, sizeof(id));
    } else {
      board.wait_id(rank, id, sizeof(id));
      for (int i = 0; i < 128; ++i) {
        if (id[i] != static_cast<unsigned char>(i * 7 + 1)) return 3;
      }
    }
    for (int round = 0; round < 20; ++round) board.barrier(rank);
    if (rank != 0) return kRankExitOk;  // finished on the board, then exits
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    return board.failure(rank).rank == -1 ? kRankExitOk : 4;  // finished peers that exited are no failure
  });
  REQUIRE(codes == std::vector<int>{0, 0, 0});
}

TEST_CASE("fork_ranks: a rank that throws stops every other rank, naming it and its message", "[rank_board]") {
  const auto t0 = clock_type::now();
  const std::vector<int> codes = fork_ranks(
      board_name("throw"), 4,
      [](int rank, RankBoard& board) {
        if (rank == 2) {
          board.barrier(rank);
          throw kvq::Error(Status::kOutOfCapacity, "plan_append: the pools lack 3 blocks");
        }
        return barriers_expecting(board, rank, 2, "rank 2 failed: plan_append: the pools lack 3 blocks");
      },
      std::chrono::seconds(60));
  const double seconds = std::chrono::duration<double>(clock_type::now() - t0).count();
  CAPTURE(seconds);
  REQUIRE(codes == std::vector<int>{kSawFailure, kSawFailure, kRankExitError, kSawFailure});
  REQUIRE(seconds < 20.0);
}

TEST_CASE("fork_ranks: a rank that exits without a word is seen as gone", "[rank_board]") {
  const auto t0 = clock_type::now();
  const std::vector<int> codes = fork_ranks(
      board_name("exit"), 3,
      [](int rank, RankBoard& board) {
        if (rank == 1) {
          board.barrier(rank);
          _exit(3);  // as a crash would: no error posted, no destructor run
        }
        return barriers_expecting(board, rank, 2, "the process of rank 1");
      },
      std::chrono::seconds(60));
  const double seconds = std::chrono::duration<double>(clock_type::now() - t0).count();
  CAPTURE(seconds);
  REQUIRE(codes == std::vector<int>{kSawFailure, 3, kSawFailure});
  REQUIRE(seconds < 20.0);
}

TEST_CASE("fork_ranks: a rank that hangs ends the others' waits at the timeout, and then learns why", "[rank_board]") {
  const std::vector<int> codes = fork_ranks(
      board_name("hang"), 2,
      [](int rank, RankBoard& board) {
        if (rank == 1) {
          std::this_thread::sleep_for(std::chrono::milliseconds(1500));
          return barriers_expecting(board, rank, 1, "rank 0 failed");
        }
        const int seen = barriers_expecting(board, rank, 1, "waited 300 ms for the other ranks at a barrier");
        if (seen == kSawFailure) throw kvq::Error(Status::kRankFailure, "rank 0 timed out");  // posted for rank 1
        return seen;
      },
      std::chrono::milliseconds(300));
  REQUIRE(codes == std::vector<int>{kRankExitError, kSawFailure});
}

TEST_CASE("RankBoard: bad arguments are named", "[rank_board]") {
  using kvq_test::require_error;
  require_error([] { RankBoard::create("a/b", 2); }, Status::kInvalidArgument, {"RankBoard::create", "name", "without '/'"});
  require_error([] { RankBoard::create(board_name("world"), 0); }, Status::kInvalidArgument, {"world_size", "0", "1 .. 64"});
  const std::string name = board_name("twice");
  RankBoard board = RankBoard::create(name, 2);
  require_error([&] { RankBoard::create(name, 2); }, Status::kIoError, {"shm_open", name});
  require_error([&] { board.join(2); }, Status::kInvalidArgument, {"RankBoard::join", "rank", "2", "0 .. 1"});
  require_error([&] { board.barrier(-1); }, Status::kInvalidArgument, {"rank", "-1"});
  require_error([] { RankBoard::open(board_name("absent"), std::chrono::milliseconds(50)); }, Status::kRankFailure,
                {"RankBoard::open", "no board", "after 50 ms"});
  // open() maps the same segment: a failure posted through one is seen through the other.
  RankBoard other = RankBoard::open(name);
  board.join(0);
  other.fail(1, "seen through the other mapping");
  REQUIRE(board.failure(0).rank == 1);
  REQUIRE(board.failure(0).message == "seen through the other mapping");
  other.fail(0, "dropped: the first failure wins");
  REQUIRE(board.failure(1).rank == 1);
  require_error([&] { board.check("here", 0); }, Status::kRankFailure, {"here: rank 0 stops: rank 1 failed: seen through"});
}
