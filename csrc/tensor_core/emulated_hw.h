// The tensor-core tile algorithms (attention_tiles.h) run on the CPU: every thread of a
// block is a host thread, __syncthreads is a barrier of those threads, and each warp-wide
// instruction (shuffle, ldmatrix, mma.sync) is a meeting of the warp's 32 threads that
// computes what the PTX ISA defines, element by element, from the layouts of fragments.h.
// It is the same interface as device_hw.cuh, so one source runs in both places.
//
// It checks what a GPU would not report: every shared-memory access is recorded, and a read
// of a word no thread wrote, or two accesses of one word by different threads between two
// barriers with one of them a write (a race), stops the launch with an error; so do global
// accesses outside the tensors registered for the launch, two threads writing one global
// element, a warp whose lanes reach different warp-wide instructions, a misaligned ldmatrix
// row, and threads that never meet at a barrier. Slow (a condition-variable meeting per
// instruction): for small shapes in tests.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "tensor_core/fragments.h"

namespace icd_tc {

// Thrown in a thread of a launch that has already failed, to unwind it.
struct EmulationAborted {};

class EmulatedBlock;

// One meeting point of `count` threads, with an OR of a flag they bring (sync_or).
class Rendezvous {
 public:
  explicit Rendezvous(int count) : count_(count) {}
  bool arrive_and_wait(const EmulatedBlock& block, bool flag);
  void wake_all() { cv_.notify_all(); }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int count_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
  bool accumulated_ = false;
  bool result_ = false;
};

// A region of global memory a launch may touch.
struct GlobalRange {
  const void* begin;
  size_t bytes;
  bool writable;
};

// The state of one block: its shared memory, the record of who touched each 2-byte unit of
// it, its barriers and its warps' exchange slots.
class EmulatedBlock {
 public:
  EmulatedBlock(int threads, size_t shared_bytes, const std::vector<GlobalRange>* ranges,
                std::unordered_map<uintptr_t, int64_t>* global_writers, std::mutex* global_mutex,
                int64_t block_id)
      : threads_(threads),
        shared_bytes_(shared_bytes),
        shared_(new uint64_t[(shared_bytes + 7) / 8 + 2]),
        units_(shared_bytes / 2 + 1),
        block_barrier_(threads),
        ranges_(ranges),
        global_writers_(global_writers),
        global_mutex_(global_mutex),
        block_id_(block_id) {
    std::memset(shared_.get(), 0xff, ((shared_bytes + 7) / 8 + 2) * 8);  // NaN if ever read
    const int warps = (threads + kWarpSize - 1) / kWarpSize;
    for (int w = 0; w < warps; ++w) {
      warp_barriers_.emplace_back(new Rendezvous(std::min(kWarpSize, threads - w * kWarpSize)));
    }
    slots_.resize(2 * static_cast<size_t>(warps) * kWarpSize);
  }

  unsigned char* shared() const { return reinterpret_cast<unsigned char*>(shared_.get()); }
  size_t shared_bytes() const { return shared_bytes_; }
  int threads() const { return threads_; }
  bool failed() const { return failed_.load(); }
  const std::string& error() const { return error_; }

  void fail(const std::string& message) {
    {
      std::lock_guard<std::mutex> lock(error_mutex_);
      if (!failed_.load()) error_ = message;
      failed_.store(true);
    }
    block_barrier_.wake_all();
    for (auto& b : warp_barriers_) b->wake_all();
  }

  // Block barrier; every thread's epoch advances past it.
  bool barrier(bool flag) { return block_barrier_.arrive_and_wait(*this, flag); }
  void warp_barrier(int warp) { warp_barriers_[warp]->arrive_and_wait(*this, false); }

  struct Slot {
    int op = 0;
    uint32_t regs[4] = {0, 0, 0, 0};
    uint32_t b[2] = {0, 0};
    float c[4] = {0, 0, 0, 0};
    float value = 0;
    int mask = 0;
    const unsigned char* address = nullptr;
  };
  // Two banks, used by alternate warp-wide instructions: a lane can only write bank b again
  // after the whole warp met at the instruction in between, that is after every lane has read
  // what it needed from bank b, so one meeting per instruction suffices.
  Slot& slot(int bank, int thread) { return slots_[bank * threads_ + thread]; }

  // Records an access of [p, p + bytes) by `thread` in `epoch`; p is in shared memory.
  void record_shared(const void* p, size_t bytes, int thread, int64_t epoch, bool write) {
    const auto offset = static_cast<size_t>(static_cast<const unsigned char*>(p) - shared());
    if (offset + bytes > shared_bytes_) {
      fail("shared memory access out of bounds: bytes [" + std::to_string(offset) + ", " +
           std::to_string(offset + bytes) + ") of " + std::to_string(shared_bytes_) +
           ", thread " + std::to_string(thread));
      throw EmulationAborted{};
    }
    std::lock_guard<std::mutex> lock(units_mutex_);
    for (size_t u = offset / 2; u < (offset + bytes + 1) / 2; ++u) {
      Unit& unit = units_[u];
      const std::string where = "shared byte " + std::to_string(2 * u) + ", thread " +
                                std::to_string(thread);
      if (write) {
        if (unit.write_epoch == epoch && unit.writer != thread) {
          fail("race: two threads write " + where + " and " + std::to_string(unit.writer) +
               " with no barrier between");
          throw EmulationAborted{};
        }
        if (unit.read_epoch == epoch && unit.other_reader(thread)) {
          fail("race: " + where + " writes a word another thread read since the last barrier");
          throw EmulationAborted{};
        }
        unit.writer = thread;
        unit.write_epoch = epoch;
      } else {
        if (unit.write_epoch < 0) {
          fail("read of uninitialised shared memory: " + where);
          throw EmulationAborted{};
        }
        if (unit.write_epoch == epoch && unit.writer != thread) {
          fail("race: " + where + " reads a word thread " + std::to_string(unit.writer) +
               " wrote with no barrier between");
          throw EmulationAborted{};
        }
        if (unit.read_epoch != epoch) {
          unit.read_epoch = epoch;
          std::memset(unit.readers, 0, sizeof unit.readers);
        }
        unit.readers[thread / 64] |= uint64_t{1} << (thread % 64);
      }
    }
  }

  // Global memory: within a registered range (writable for stores); a store records its
  // writer, and two different threads storing to one address is an error.
  void check_global(const void* p, size_t bytes, int thread, bool write) {
    const auto* c = static_cast<const unsigned char*>(p);
    for (const GlobalRange& r : *ranges_) {
      const auto* b = static_cast<const unsigned char*>(r.begin);
      if (c >= b && c + bytes <= b + r.bytes) {
        if (write && !r.writable) break;
        if (write) {
          const int64_t who = block_id_ * 4096 + thread;
          std::lock_guard<std::mutex> lock(*global_mutex_);
          auto [it, inserted] = global_writers_->emplace(reinterpret_cast<uintptr_t>(p), who);
          if (!inserted && it->second != who) {
            fail("two threads (block " + std::to_string(it->second / 4096) + " thread " +
                 std::to_string(it->second % 4096) + ", block " + std::to_string(block_id_) +
                 " thread " + std::to_string(thread) + ") write one global element");
            throw EmulationAborted{};
          }
        }
        return;
      }
    }
    fail(std::string("global ") + (write ? "store" : "load") +
         " outside the launch's tensors, thread " + std::to_string(thread) + " of block " +
         std::to_string(block_id_));
    throw EmulationAborted{};
  }

  bool in_shared(const void* p) const {
    const auto* c = static_cast<const unsigned char*>(p);
    return c >= shared() && c < shared() + shared_bytes_ + 16;
  }

 private:
  struct Unit {
    int writer = -1;
    int64_t write_epoch = -1;
    int64_t read_epoch = -1;
    uint64_t readers[16] = {};  // up to 1024 threads
    bool other_reader(int thread) const {
      for (int i = 0; i < 16; ++i) {
        uint64_t bits = readers[i];
        if (i == thread / 64) bits &= ~(uint64_t{1} << (thread % 64));
        if (bits != 0) return true;
      }
      return false;
    }
  };

  int threads_;
  size_t shared_bytes_;
  std::unique_ptr<uint64_t[]> shared_;
  std::vector<Unit> units_;
  std::mutex units_mutex_;
  Rendezvous block_barrier_;
  std::vector<std::unique_ptr<Rendezvous>> warp_barriers_;
  std::vector<Slot> slots_;
  const std::vector<GlobalRange>* ranges_;
  std::unordered_map<uintptr_t, int64_t>* global_writers_;
  std::mutex* global_mutex_;
  int64_t block_id_;
  std::atomic<bool> failed_{false};
  std::mutex error_mutex_;
  std::string error_;
};

inline bool Rendezvous::arrive_and_wait(const EmulatedBlock& block, bool flag) {
  std::unique_lock<std::mutex> lock(mutex_);
  if (block.failed()) throw EmulationAborted{};
  const uint64_t generation = generation_;
  accumulated_ = accumulated_ || flag;
  if (++arrived_ == count_) {
    arrived_ = 0;
    result_ = accumulated_;
    accumulated_ = false;
    ++generation_;
    cv_.notify_all();
    return result_;
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (generation_ == generation) {
    cv_.wait_for(lock, std::chrono::milliseconds(50));
    if (block.failed()) throw EmulationAborted{};
    if (std::chrono::steady_clock::now() > deadline) {
      lock.unlock();
      const_cast<EmulatedBlock&>(block).fail(
          "deadlock: threads of a block never met at a barrier or warp-wide instruction "
          "(divergent __syncthreads or collective)");
      throw EmulationAborted{};
    }
  }
  return result_;
}

// Converts the 16-bit element in the low (h = 0) or high half of `reg` to float.
template <typename T>
inline float element_of(uint32_t reg, int h) {
  const auto bits = static_cast<uint16_t>(h == 0 ? reg & 0xffffu : reg >> 16);
  return static_cast<float>(T(bits, T::from_bits()));
}

// The thread-side view: device_hw.cuh's interface for one emulated thread.
class EmulatedHw {
 public:
  EmulatedHw(EmulatedBlock* block, int thread, int64_t bx, int64_t by, int64_t bz)
      : block_(block), thread_(thread), bx_(bx), by_(by), bz_(bz) {}

  int thread() const { return thread_; }
  unsigned char* shared_memory() const { return block_->shared(); }
  int64_t block_x() const { return bx_; }
  int64_t block_y() const { return by_; }
  int64_t block_z() const { return bz_; }

  void sync() { sync_or(false); }
  bool sync_or(bool p) {
    const bool result = block_->barrier(p);
    ++epoch_;
    return result;
  }

  float shfl_xor(float x, int mask) {
    auto& mine = begin_collective(kShuffle);
    mine.value = x;
    mine.mask = mask;
    meet();
    check_same_op(kShuffle, [&](const EmulatedBlock::Slot& s) { return s.mask == mask; });
    return other(lane() ^ mask).value;
  }

  float exp2(float x) const { return std::exp2(x); }

  template <typename U>
  U load(const U* p) {
    track(p, sizeof(U), false);
    return *p;
  }
  template <typename U>
  void store(U* p, U x) {
    track(p, sizeof(U), true);
    *p = x;
  }

  template <bool kTrans>
  void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
    auto& mine = begin_collective(kTrans ? kLdmatrixTrans : kLdmatrix);
    mine.address = static_cast<const unsigned char*>(row);
    if (!block_->in_shared(row) ||
        (static_cast<const unsigned char*>(row) - block_->shared()) % 16 != 0) {
      block_->fail("ldmatrix: the row address of lane " + std::to_string(lane()) +
                   " is not a 16-byte aligned shared-memory address");
      throw EmulationAborted{};
    }
    meet();
    check_same_op(kTrans ? kLdmatrixTrans : kLdmatrix, [](const EmulatedBlock::Slot&) { return true; });
    for (int m = 0; m < 4; ++m) {
      uint32_t reg = 0;
      for (int h = 0; h < 2; ++h) {
        const int source = ldmatrix_source_lane(lane(), m, h, kTrans);
        const unsigned char* element =
            other(source).address + 2 * ldmatrix_source_col(lane(), h, kTrans);
        track(element, 2, false);
        uint16_t bits;
        std::memcpy(&bits, element, 2);
        reg |= static_cast<uint32_t>(bits) << (16 * h);
      }
      r[m] = reg;
    }
  }

  template <typename T>
  void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    auto& mine = begin_collective(kMma);
    std::memcpy(mine.regs, a, sizeof a);
    std::memcpy(mine.b, b, sizeof b);
    std::memcpy(mine.c, d, sizeof d);
    meet();
    check_same_op(kMma, [](const EmulatedBlock::Slot&) { return true; });
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < kWarpSize; ++l) {
      const auto& s = other(l);
      for (int i = 0; i < kAElements; ++i) A[a_row(l, i)][a_col(l, i)] = element_of<T>(s.regs[i >> 1], i & 1);
      for (int i = 0; i < kBElements; ++i) B[b_row(l, i)][b_col(l, i)] = element_of<T>(s.b[i >> 1], i & 1);
      for (int i = 0; i < kCElements; ++i) C[c_row(l, i)][c_col(l, i)] = s.c[i];
    }
    for (int i = 0; i < kCElements; ++i) {
      const int row = c_row(lane(), i);
      const int col = c_col(lane(), i);
      float sum = C[row][col];
      for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
      d[i] = sum;
    }
  }

 private:
  enum Op { kShuffle = 1, kLdmatrix, kLdmatrixTrans, kMma };

  int lane() const { return thread_ % kWarpSize; }
  int warp() const { return thread_ / kWarpSize; }
  int warp_base() const { return warp() * kWarpSize; }

  EmulatedBlock::Slot& begin_collective(Op op) {
    if (block_->threads() % kWarpSize != 0) {
      block_->fail("warp-wide instruction in a block whose size is not a multiple of 32");
      throw EmulationAborted{};
    }
    bank_ = 1 - bank_;
    auto& mine = block_->slot(bank_, thread_);
    mine.op = op;
    return mine;
  }
  void meet() { block_->warp_barrier(warp()); }
  // Lane `l`'s slot of the current instruction.
  const EmulatedBlock::Slot& other(int l) const { return block_->slot(bank_, warp_base() + l); }

  template <typename Same>
  void check_same_op(Op op, Same same) {
    for (int l = 0; l < kWarpSize; ++l) {
      const auto& s = other(l);
      if (s.op != op || !same(s)) {
        block_->fail("lanes " + std::to_string(lane()) + " and " + std::to_string(l) + " of warp " +
                     std::to_string(warp()) + " are at different warp-wide instructions");
        throw EmulationAborted{};
      }
    }
  }

  void track(const void* p, size_t bytes, bool write) {
    if (block_->in_shared(p)) {
      block_->record_shared(p, bytes, thread_, epoch_, write);
    } else {
      block_->check_global(p, bytes, thread_, write);
    }
  }

  EmulatedBlock* block_;
  int thread_;
  int64_t bx_, by_, bz_;
  int64_t epoch_ = 0;
  int bank_ = 0;
};

// Runs `body(hw)` for every thread of every block of a grid (blocks one after another, the
// threads of a block concurrently); `ranges` are the tensors the kernel may touch. Throws
// std::runtime_error with the first failure.
inline void emulate_launch(int64_t gx, int64_t gy, int64_t gz, int threads, size_t shared_bytes,
                           const std::vector<GlobalRange>& ranges,
                           const std::function<void(EmulatedHw&)>& body) {
  std::unordered_map<uintptr_t, int64_t> global_writers;
  std::mutex global_mutex;
  int64_t block_id = 0;
  for (int64_t z = 0; z < gz; ++z) {
    for (int64_t y = 0; y < gy; ++y) {
      for (int64_t x = 0; x < gx; ++x, ++block_id) {
        EmulatedBlock block(threads, shared_bytes, &ranges, &global_writers, &global_mutex, block_id);
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (int t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            EmulatedHw hw(&block, t, x, y, z);
            try {
              body(hw);
            } catch (const EmulationAborted&) {
            } catch (const std::exception& e) {
              block.fail(e.what());
            }
          });
        }
        for (auto& thread : pool) thread.join();
        if (block.failed()) {
          throw std::runtime_error("tensor-core emulation, block (" + std::to_string(x) + ", " +
                                   std::to_string(y) + ", " + std::to_string(z) + "): " +
                                   block.error());
        }
      }
    }
  }
}

}  // namespace icd_tc
