// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief A pool of fixed-size, reference-counted byte blocks, allocated once, and its id
///        bookkeeping (BlockIdAllocator) on its own.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include "kvq/core/bits.hpp"
#include "kvq/core/error.hpp"
#include "kvq/layout/stream_layout.hpp"

namespace kvq {

/// The id bookkeeping of a pool of num_blocks blocks, without their bytes: reference counts and
/// a free list (lowest id first). BlockPool keeps its blocks' ids with it; the device cache
/// (kvq/cuda/device_cache.cuh) allocates the ids of its GPU pools with it on the host, so both
/// hand out the same ids for the same sequence of operations.
class BlockIdAllocator {
 public:
  BlockIdAllocator() = default;
  explicit BlockIdAllocator(index_t num_blocks) : num_blocks_(num_blocks) {
    if (num_blocks < 0) {
      detail::throw_argument_error("kvq::BlockIdAllocator", "num_blocks", num_blocks, "num_blocks >= 0");
    }
    refs_.assign(static_cast<std::size_t>(num_blocks), 0);
    free_.reserve(static_cast<std::size_t>(num_blocks));
    for (index_t b = num_blocks - 1; b >= 0; --b) free_.push_back(static_cast<std::int32_t>(b));
  }

  index_t num_blocks() const noexcept { return num_blocks_; }
  index_t free_blocks() const noexcept { return static_cast<index_t>(free_.size()); }
  index_t used_blocks() const noexcept { return num_blocks_ - free_blocks(); }
  /// References to block b (0: free).
  std::int32_t refs(std::int32_t b) const noexcept { return refs_[static_cast<std::size_t>(b)]; }

  /// Takes a free id with reference count 1 (precondition: free_blocks() > 0).
  std::int32_t allocate() noexcept {
    const std::int32_t b = free_.back();
    free_.pop_back();
    refs_[static_cast<std::size_t>(b)] = 1;
    return b;
  }
  void retain(std::int32_t b) noexcept { ++refs_[static_cast<std::size_t>(b)]; }
  void release(std::int32_t b) noexcept {
    if (--refs_[static_cast<std::size_t>(b)] == 0) free_.push_back(b);
  }

 private:
  index_t num_blocks_ = 0;
  std::vector<std::int32_t> refs_;
  std::vector<std::int32_t> free_;
};

/// num_blocks blocks of block_bytes bytes (a multiple of kBlockAlignment), in one allocation made
/// by the constructor. Blocks are handed out with reference count 1; fork shares full blocks by
/// retaining them; a block returns to the free list when its count drops to 0.
class BlockPool {
 public:
  BlockPool() = default;
  BlockPool(std::size_t block_bytes, index_t num_blocks)
      : block_bytes_(block_bytes), num_blocks_(num_blocks) {
    if (num_blocks < 0) {
      detail::throw_argument_error("kvq::BlockPool", "num_blocks", num_blocks, "num_blocks >= 0");
    }
    const std::size_t bytes = block_bytes * static_cast<std::size_t>(num_blocks);
    if (bytes > 0) {
      data_.reset(static_cast<std::uint8_t*>(
          ::operator new(bytes, std::align_val_t{kBlockAlignment})));
    }
    ids_ = BlockIdAllocator(num_blocks);
  }
  /// A pool of ids.num_blocks() blocks whose ids are in the state `ids` (reference counts, free
  /// list), its bytes uninitialised: for QuantizedKVCache::restore, whose caller writes them all.
  BlockPool(std::size_t block_bytes, const BlockIdAllocator& ids) : BlockPool(block_bytes, ids.num_blocks()) { ids_ = ids; }

  std::size_t block_bytes() const noexcept { return block_bytes_; }
  index_t num_blocks() const noexcept { return num_blocks_; }
  index_t free_blocks() const noexcept { return ids_.free_blocks(); }
  index_t used_blocks() const noexcept { return num_blocks_ - free_blocks(); }
  /// Bytes of the blocks in use.
  std::size_t used_bytes() const noexcept {
    return static_cast<std::size_t>(used_blocks()) * block_bytes_;
  }
  /// Bytes of the whole pool.
  std::size_t reserved_bytes() const noexcept {
    return static_cast<std::size_t>(num_blocks_) * block_bytes_;
  }
  /// The ids' reference counts and free list.
  const BlockIdAllocator& ids() const noexcept { return ids_; }

  /// Takes a free block, zero-filled (precondition: free_blocks() > 0). Zeroing makes every
  /// block's unwritten bytes (padding, unused packed digits) deterministic.
  std::int32_t allocate() noexcept {
    const std::int32_t b = ids_.allocate();
    std::memset(data(b), 0, block_bytes_);
    return b;
  }
  void retain(std::int32_t b) noexcept { ids_.retain(b); }
  void release(std::int32_t b) noexcept { ids_.release(b); }

  /// All num_blocks blocks, block b at data() + b * block_bytes() (nullptr for an empty pool).
  std::uint8_t* data() noexcept { return data_.get(); }
  const std::uint8_t* data() const noexcept { return data_.get(); }
  std::uint8_t* data(std::int32_t b) noexcept {
    return data_.get() + static_cast<std::size_t>(b) * block_bytes_;
  }
  const std::uint8_t* data(std::int32_t b) const noexcept {
    return data_.get() + static_cast<std::size_t>(b) * block_bytes_;
  }

 private:
  struct AlignedDelete {
    void operator()(std::uint8_t* p) const noexcept {
      ::operator delete(p, std::align_val_t{kBlockAlignment});
    }
  };
  std::size_t block_bytes_ = 0;
  index_t num_blocks_ = 0;
  std::unique_ptr<std::uint8_t, AlignedDelete> data_;
  BlockIdAllocator ids_;
};

}  // namespace kvq
