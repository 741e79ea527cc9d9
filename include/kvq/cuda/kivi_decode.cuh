// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Fused split-KV decode attention on KIVI's packed blocks (2- or 4-bit keys per channel,
///        values per token, fp16 metadata, block of 128 tokens), tensor cores reading the codes
///        straight from the block bytes. nvcc only.
///
/// Grid (num_kv_heads, pieces, batch), 128 threads. Pieces kTailPieces .. pieces - 1 share the
/// blocks whose keys and values are both quantized; each warp of a piece takes every 4th of them
/// and streams its kv head's part of each block (key codes and metadata contiguous, value rows of
/// head_dim * bits / 8 bytes, value metadata a contiguous run: layout/block_layout.hpp) into its
/// shared-memory stage with cp.async (warps in flight, up to 12 per SM, hide the loads). Pieces 0 .. kTailPieces - 1 (first in the grid, so
/// that they run beside the others rather than after them) do the rest, 64 positions each (the
/// blocks that are partly exact, the fp16 window), from rows dequantized into shared memory.
///
/// One block of one kv head, per warp (lane = 4g + t):
/// - scores S [128 tokens][8 heads] = K Q^T as 8 x (head_dim / 16) mma m16n8k16. Row r of token
///   tile i is token 16 (r % 8) + 2i + r / 8, so lane g's rows over the 8 tiles are tokens
///   16g .. 16g + 15: one 16-code run of each key line. Column k of k-chunk kc is channel
///   16 kc + rho(k), rho = {0,4,1,5,2,6,3,7, 8,12,9,13,10,14,11,15} (k = 2t, 2t+1, 2t+8, 2t+9
///   -> channels t, t+4, t+8, t+12), which keeps the lanes' shared-memory reads conflict-free.
/// - codes -> fp16 with the 0x6400 exponent trick: prmt joins two lanes' runs, lop3 masks two
///   codes into (1024 + c) pairs. Where a group's scale and zero-point fold out of the mma (group
///   128), the pairs enter biased, 1024 + 2^bit c (biased_pair: one shift, two lop3 per four
///   codes), and the fp32 epilogue takes the offset and 2^bit out (scores: one fma per element;
///   values: a per-head sum of P by one more mma per token tile taken off at the block's end,
///   2^bit at the piece's end by unbias_values); otherwise one fma (exact_pair) makes them exact
///   small integers before the dequantizing fma.
/// - group 128 keys (one group per line and block): the key scales fold into the queries
///   (B = q * scale as fp16 hi + lo: hmul2, hfma2) and the zero-points into one bias per head,
///   sum(B) and q . zero from one more mma per k-chunk with the scales and zero-points as A;
///   otherwise each pair is dequantized with one fused multiply-add (each lane's tokens lie in
///   one group).
/// - O^T [head_dim][8 heads] += V^T P^T: P comes from the score fragments by movmatrix; row r of
///   channel tile j is channel g * head_dim / 8 + 2j + r / 8 (lane g's rows are one run of each
///   value row), k = the score tile's tokens. Values in one group per head and token fold their
///   scale into P and their zero-point into a per-head sum added at the end.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kvq/core/float_types.hpp"
#include "kvq/cuda/decode_common.cuh"
#include "kvq/layout/paged_params.hpp"
#include "kvq/quant/params.hpp"

namespace kvq {
namespace cuda {
namespace detail {

/// Sizes of one kv head's part of a KIVI block in the shared-memory stage.
template <int KBITS, int VBITS, int KG, int VG, int D>
struct KiviTile {
  static constexpr int kTokens = 128;
  static constexpr int kKeyLine = kTokens * KBITS / 8;  ///< bytes of one channel's codes
  static constexpr int kKeyCodes = D * kKeyLine;
  static constexpr int kKeyGroups = kTokens / KG;       ///< token groups per key line
  static constexpr int kKeyMeta = D * kKeyGroups * 2;   ///< fp16 scales (or zero-points) of the head
  static constexpr int kValueRow = D * VBITS / 8;       ///< bytes of one token's codes of the head
  static constexpr int kValueCodes = kTokens * kValueRow;
  static constexpr int kValueGroups = VG >= D ? 1 : D / VG;  ///< channel groups of the head
  static constexpr int kValueMeta = kValueGroups * kTokens * 2;
  static constexpr int kKeyScales = kKeyCodes;
  static constexpr int kKeyZeros = kKeyScales + kKeyMeta;
  static constexpr int kValues = kKeyZeros + kKeyMeta;
  static constexpr int kValueScales = kValues + kValueCodes;
  static constexpr int kValueZeros = kValueScales + kValueMeta;
  static constexpr int kStage = kValueZeros + kValueMeta;
  static constexpr bool kFoldKeys = KG == kTokens;
  static constexpr bool kFoldValues = VG >= D;
  static constexpr int kChunks = D / 16;      ///< k-chunks of the scores, channel tiles of the output
  static constexpr int kLaneChannels = D / 8; ///< value channels per lane g
  static constexpr int kLaneKeyBytes = 16 * KBITS / 8;
  static constexpr int kLaneValueBytes = kLaneChannels * VBITS / 8;
  // The tail's dequantized rows: keys [64][D + 8] in rho order, values [D][64 + 8] in row order.
  static constexpr int kTailTokens = 64;
  /// Pieces of the rest after the full blocks: at most 127 rows of a partial block and a window
  /// ring of 256 rows (KIVI's key ring) -> 383 positions -> 6 chunks of 64.
  static constexpr int kTailPieces = 6;
  static constexpr int kTailKeyStride = D + 8;
  static constexpr int kTailValueStride = kTailTokens + 8;
  static constexpr int kTailBytes = (kTailTokens * kTailKeyStride + D * kTailValueStride) * 2;
  /// The queries' B fragments [kChunks][2][32 lanes] of uint32, after the warps' stages.
  static constexpr int kQueryBytes = kChunks * 2 * 32 * 4;
  /// Shared memory of one SM (H100 / H200) and what the runtime reserves per thread block.
  static constexpr int kSmPerSm = 233472, kSmReserved = 1024;
  static constexpr int kQueryFrags = kDecodeWarps * kStage;
  static constexpr int kSmem = [] {
    int s = kQueryFrags + kQueryBytes;
    if (s < kTailBytes) s = kTailBytes;
    if (s < static_cast<int>(sizeof(WarpMergeSmem<D>))) s = static_cast<int>(sizeof(WarpMergeSmem<D>));
    return s;
  }();
  /// Thread blocks per SM that shared memory allows (at most 3): ptxas fits the registers to it.
  /// (4, at 128 registers with 20 bytes of spills, was slower at 128K and g32: NOTES.md.)
  static constexpr int kMinBlocks = [] {
    const int n = kSmPerSm / (kSmem + kSmReserved);
    return n < 1 ? 1 : n > 3 ? 3 : n;
  }();
  static_assert(kValueRow % 16 == 0 && kKeyLine % 16 == 0, "kvq: KIVI tile rows must be whole 16-byte chunks");
};

/// Shared-memory row of value token `tok` (spreads the 4 lanes t over the bank groups).
__device__ __forceinline__ int value_row(int tok) { return tok ^ ((tok >> 5) & 3); }

/// Column of key channel c (0 .. D-1) in the tail's rho-ordered key rows.
__device__ __forceinline__ int rho_column(int c) {
  const int c16 = c & 15, low = c16 & 7;
  return (c & ~15) + (c16 & 8) + 2 * (low & 3) + (low >> 2);
}

__device__ __forceinline__ std::uint32_t h2_bits(__half2 x) { return *reinterpret_cast<std::uint32_t*>(&x); }
__device__ __forceinline__ __half2 bits_h2(std::uint32_t x) { return *reinterpret_cast<__half2*>(&x); }

/// How code E of two lanes' runs of BITS-bit codes (LSB first; run a in the low, run b in the
/// high halves of the pair) enters the mma: as the fp16 pair (1024 + 2^p a[E], 1024 + 2^p b[E]),
/// p = bit(E), since the fp16 number 0x6400 | (c << p) is exactly 1024 + 2^p c (p + BITS <= 10).
/// Codes 2I and 2I + 1 come from one word: prmt joins the two runs' halves that hold them, one
/// shift puts code 2I at bit kEven and 2I + 1 at kOdd, and one lop3 each masks them in. So an mma
/// on such pairs gives 2^p (codes . B) + 1024 sum(B) per row (rows take codes of one parity, so
/// one p each), which the fp32 epilogue turns into codes . B with one fma, or exact_pair makes
/// exact small integers. The bits are as high as the 10 mantissa bits allow (kOdd's top bit is
/// bit 9), which keeps the offset 1024 within 2^(10 - p) / mean code of the signal (2-bit 43x and
/// 11x, 4-bit 34x and 2x): the tensor cores' fp32 accumulation truncates at about 2^-23 of its
/// largest term, so the offset's share of the error stays near 1e-5 of the result. (Byte
/// rotations without the shift would save one instruction in six but put codes at bit 2 and 0:
/// 4x the error, measured on the CUDA example, NOTES.md.)
template <int BITS>
struct BiasedCode {
  static constexpr int kPerWord = 32 / BITS;
  static constexpr int kEven = BITS == 2 ? 4 : 2;
  static constexpr int kOdd = kEven + BITS;
  static constexpr float kOffset = 1024.0f;
  __host__ __device__ static constexpr int bit(int e) { return e % 2 == 0 ? kEven : kOdd; }
  /// 2^-bit(e), the factor that takes the code's place value out in the epilogue.
  __host__ __device__ static constexpr float unit(int e) { return 1.0f / static_cast<float>(1 << bit(e)); }
};

template <int BITS, int E>
__device__ __forceinline__ std::uint32_t biased_pair(uint2 a, uint2 b) {
  using C = BiasedCode<BITS>;
  constexpr int e = E - E % 2;  // the pair's even code: the shifted word is shared by both
  constexpr int word = e / C::kPerWord;
  constexpr int in_word = e % C::kPerWord;
  constexpr int half = in_word / (C::kPerWord / 2);
  constexpr int at = (in_word % (C::kPerWord / 2)) * BITS;  // bit of code e in its half
  constexpr int move = C::kEven - at;                       // |move| <= 8: no bit crosses the halves' masks
  constexpr int p = C::bit(E);
  constexpr std::uint32_t m = (1u << BITS) - 1u;
  std::uint32_t z = ptx::prmt(word ? a.y : a.x, word ? b.y : b.x, half ? 0x7632u : 0x5410u);
  if constexpr (move > 0) z <<= move;
  if constexpr (move < 0) z >>= -move;
  return ptx::and_or(z, (m << p) | (m << (16 + p)), 0x64006400u);
}

/// biased_pair's pair as the exact codes (a[E], b[E]).
template <int BITS, int E>
__device__ __forceinline__ std::uint32_t exact_pair(uint2 a, uint2 b) {
  constexpr float u = BiasedCode<BITS>::unit(E);
  const __half2 x = bits_h2(biased_pair<BITS, E>(a, b));
  return h2_bits(__hfma2(x, __float2half2_rn(u), __float2half2_rn(-BiasedCode<BITS>::kOffset * u)));
}

/// A lane's run of `bytes` (2, 4 or 8) bytes of shared memory as uint2.
template <int BYTES>
__device__ __forceinline__ uint2 load_run(const std::uint8_t* p) {
  if constexpr (BYTES == 8) {
    return *reinterpret_cast<const uint2*>(p);
  } else if constexpr (BYTES == 4) {
    return make_uint2(*reinterpret_cast<const std::uint32_t*>(p), 0u);
  } else {
    return make_uint2(*reinterpret_cast<const std::uint16_t*>(p), 0u);
  }
}

__device__ __forceinline__ __half2 half_pair(const std::uint8_t* base, int i, int j) {
  const __half* h = reinterpret_cast<const __half*>(base);
  return __halves2half2(h[i], h[j]);
}

/// Lane `lane`'s share of copying BYTES (a multiple of 16) contiguous bytes global -> shared.
template <int BYTES>
__device__ __forceinline__ void issue_run(std::uint8_t* dst, const std::uint8_t* src, int lane) {
  constexpr int chunks = BYTES / 16;
#pragma unroll
  for (int k = 0; k < (chunks + 31) / 32; ++k) {
    const int c = lane + 32 * k;
    if (chunks % 32 == 0 || c < chunks) ptx::cp_async_16(dst + 16 * c, src + 16 * c);
  }
}

/// Issues the cp.async copies of kv head `head`'s part of key block kb into a stage's key half
/// (codes, scales, zeros).
template <class Tile>
__device__ __forceinline__ void issue_keys(std::uint8_t* st, const std::uint8_t* kb, const PagedKVParams& kv, int head,
                                           int lane) {
  issue_run<Tile::kKeyCodes>(st, kb + static_cast<std::size_t>(head) * Tile::kKeyCodes, lane);
  const std::size_t kmeta = static_cast<std::size_t>(head) * Tile::kKeyMeta;
  issue_run<Tile::kKeyMeta>(st + Tile::kKeyScales, kb + kv.keys.block.scales_offset + kmeta, lane);
  issue_run<Tile::kKeyMeta>(st + Tile::kKeyZeros, kb + kv.keys.block.zeros_offset + kmeta, lane);
}

/// Issues the cp.async copies of kv head `head`'s part of value block vb into a stage's value half.
template <class Tile, int VG, int D>
__device__ __forceinline__ void issue_values(std::uint8_t* st, const std::uint8_t* vb, const PagedKVParams& kv, int head,
                                             int lane) {
  // 16-byte chunk c = lane + 32 k is part c % parts of row c / parts: the lane's part is fixed and
  // its rows step by 32 / parts.
  constexpr int parts = Tile::kValueRow / 16;
  static_assert(32 % parts == 0, "kvq: a value row is 1, 2 or 4 chunks");
  const std::size_t vline = kv.values.block.line_bytes;
  const int part = lane % parts, row0 = lane / parts;
  const std::uint8_t* src = vb + static_cast<std::size_t>(head) * Tile::kValueRow + row0 * vline + 16 * part;
#pragma unroll
  for (int k = 0; k < Tile::kTokens * parts / 32; ++k) {
    const int row = row0 + k * (32 / parts);
    ptx::cp_async_16(st + Tile::kValues + value_row(row) * Tile::kValueRow + 16 * part,
                     src + static_cast<std::size_t>(k * (32 / parts)) * vline);
  }
  // Group-major value metadata: the head's first group, then the next ones, each [128 tokens].
  const int first_group = VG >= D ? head * D / VG : head * Tile::kValueGroups;
  const std::size_t vmeta = static_cast<std::size_t>(first_group) * Tile::kTokens * 2;
  issue_run<Tile::kValueMeta>(st + Tile::kValueScales, vb + kv.values.block.scales_offset + vmeta, lane);
  issue_run<Tile::kValueMeta>(st + Tile::kValueZeros, vb + kv.values.block.zeros_offset + vmeta, lane);
}

/// One staged block of one kv head through the warp's softmax state (see the file comment).
template <class Tile, int KBITS, int VBITS, int KG, int VG, int D>
__device__ __forceinline__ void attend_block(const std::uint8_t* st, SoftmaxLanes<Tile::kChunks>& sm,
                                             const std::uint32_t* qfrag, float qscale, int g, int t) {
  constexpr int KC = Tile::kChunks;
  using KCode = BiasedCode<KBITS>;
  using VCode = BiasedCode<VBITS>;
  // ---- scores ----
  // Folded keys: B = q * scale as an fp16 pair hi + lo (two mmas: the product keeps 22 bits), and
  // one more mma per k-chunk, with the scales in A's rows g and the zero-points in its rows g + 8,
  // sums sum(B) and q . zero per head exactly in fp32 (meta: rows g for heads 2t, 2t + 1, then
  // rows g + 8). Scores are scaled by qscale (softmax scale * log2 e) in fp32 after the mma, so
  // the fp16 queries enter unrounded.
  float meta[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  float s[8][4];
#pragma unroll
  for (int i = 0; i < 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
  // Not unrolled: one k-chunk's codes, queries and B in registers at a time (the scores and the
  // accumulator stay; unrolled, ptxas takes 255 registers and two thread blocks per SM).
  const int lane = 4 * g + t;
#pragma unroll 1
  for (int kc = 0; kc < KC; ++kc) {
    const int ca = 16 * kc + t;
    const std::uint32_t qk[2] = {qfrag[(2 * kc) * 32 + lane], qfrag[(2 * kc + 1) * 32 + lane]};
    const uint2 wa = load_run<Tile::kLaneKeyBytes>(st + ca * Tile::kKeyLine + g * Tile::kLaneKeyBytes);
    const uint2 wb = load_run<Tile::kLaneKeyBytes>(st + (ca + 4) * Tile::kKeyLine + g * Tile::kLaneKeyBytes);
    const uint2 wc = load_run<Tile::kLaneKeyBytes>(st + (ca + 8) * Tile::kKeyLine + g * Tile::kLaneKeyBytes);
    const uint2 wd = load_run<Tile::kLaneKeyBytes>(st + (ca + 12) * Tile::kKeyLine + g * Tile::kLaneKeyBytes);
    const std::uint8_t* ks = st + Tile::kKeyScales;
    const std::uint8_t* kz = st + Tile::kKeyZeros;
    __half2 sab, zab, scd, zcd;  // the metadata of channels (ca, ca + 4) and (ca + 8, ca + 12)
    {
      constexpr int G = Tile::kKeyGroups;
      const int grp = Tile::kFoldKeys ? 0 : (16 * g) / KG;
      sab = half_pair(ks, ca * G + grp, (ca + 4) * G + grp);
      zab = half_pair(kz, ca * G + grp, (ca + 4) * G + grp);
      scd = half_pair(ks, (ca + 8) * G + grp, (ca + 12) * G + grp);
      zcd = half_pair(kz, (ca + 8) * G + grp, (ca + 12) * G + grp);
    }
    std::uint32_t bk[2], bl[2];
    if constexpr (Tile::kFoldKeys) {
      const __half2 sc[2] = {sab, scd};
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const __half2 hi = __hmul2_rn(bits_h2(qk[r]), sc[r]);
        bk[r] = h2_bits(hi);
        bl[r] = h2_bits(__hfma2(bits_h2(qk[r]), sc[r], __hneg2(hi)));  // exact: the product's low bits
      }
      const std::uint32_t am[4] = {h2_bits(sab), h2_bits(zab), h2_bits(scd), h2_bits(zcd)};
      ptx::mma_16816<__half>(meta, am, qk);
    }
    auto tile = [&](auto ic) {
      constexpr int i = decltype(ic)::value;
      std::uint32_t a[4];
      if constexpr (Tile::kFoldKeys) {
        a[0] = biased_pair<KBITS, 2 * i>(wa, wb);
        a[1] = biased_pair<KBITS, 2 * i + 1>(wa, wb);
        a[2] = biased_pair<KBITS, 2 * i>(wc, wd);
        a[3] = biased_pair<KBITS, 2 * i + 1>(wc, wd);
        ptx::mma_16816<__half>(s[i], a, bk);
        ptx::mma_16816<__half>(s[i], a, bl);
      } else {
        a[0] = h2_bits(__hfma2(bits_h2(exact_pair<KBITS, 2 * i>(wa, wb)), sab, zab));
        a[1] = h2_bits(__hfma2(bits_h2(exact_pair<KBITS, 2 * i + 1>(wa, wb)), sab, zab));
        a[2] = h2_bits(__hfma2(bits_h2(exact_pair<KBITS, 2 * i>(wc, wd)), scd, zcd));
        a[3] = h2_bits(__hfma2(bits_h2(exact_pair<KBITS, 2 * i + 1>(wc, wd)), scd, zcd));
        ptx::mma_16816<__half>(s[i], a, qk);
      }
    };
    static_for<8>(tile);
  }
  // ---- softmax ----
  // Scores in log2 units. Folded keys: rows g (lo) and g + 8 (hi) of tile i hold
  // raw = 2^p (codes . B) + 1024 sum(B), p = bit(2i) and bit(2i + 1), so the score is
  // raw * qscale 2^-p + (q . zero - 1024 sum(B) 2^-p) qscale for heads 2t, 2t + 1.
  auto score = [&](float raw, float u, int col) {
    if constexpr (!Tile::kFoldKeys) return raw * qscale;
    return fmaf(raw, qscale * u, fmaf(-KCode::kOffset * u, meta[col], meta[2 + col]) * qscale);
  };
  float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float ulo = KCode::unit(2 * i), uhi = KCode::unit(2 * i + 1);
    s[i][0] = score(s[i][0], ulo, 0);
    s[i][1] = score(s[i][1], ulo, 1);
    s[i][2] = score(s[i][2], uhi, 0);
    s[i][3] = score(s[i][3], uhi, 1);
    mx0 = fmaxf(mx0, fmaxf(s[i][0], s[i][2]));
    mx1 = fmaxf(mx1, fmaxf(s[i][1], s[i][3]));
  }
  sm.rescale(max_over_rows(mx0), max_over_rows(mx1));
  std::uint32_t pb[8][2];
  const std::uint8_t* vs = st + Tile::kValueScales;
  const std::uint8_t* vz = st + Tile::kValueZeros;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    float p0 = ptx::exp2_approx(s[i][0] - sm.m[0]), p1 = ptx::exp2_approx(s[i][1] - sm.m[1]);
    float p2 = ptx::exp2_approx(s[i][2] - sm.m[0]), p3 = ptx::exp2_approx(s[i][3] - sm.m[1]);
    sm.l[0] += p0 + p2;
    sm.l[1] += p1 + p3;
    if constexpr (Tile::kFoldValues) {
      // The tokens of rows g and g + 8 of tile i: 16 g + 2 i and the next one.
      const float2 sv = __half22float2(*reinterpret_cast<const __half2*>(vs + 4 * (8 * g + i)));
      const float2 zv = __half22float2(*reinterpret_cast<const __half2*>(vz + 4 * (8 * g + i)));
      sm.zsum[0] = fmaf(p0, zv.x, fmaf(p2, zv.y, sm.zsum[0]));
      sm.zsum[1] = fmaf(p1, zv.x, fmaf(p3, zv.y, sm.zsum[1]));
      p0 *= sv.x;
      p1 *= sv.x;
      p2 *= sv.y;
      p3 *= sv.y;
    }
    pb[i][0] = ptx::movmatrix_trans(ptx::MmaType<__half>::pack(p0, p1));
    pb[i][1] = ptx::movmatrix_trans(ptx::MmaType<__half>::pack(p2, p3));
  }
  // ---- values ----
  // Folded values: the codes enter biased (biased_pair), and one more mma per token tile with
  // all-ones A sums this block's P (as fp16, as the value mmas read it) per head, and 1024 times
  // that sum comes off the accumulator at the block's end (one fma per accumulator, so that the
  // offset never builds up over a piece: the accumulation's truncation error stays relative to one
  // block's offset); the piece's epilogue (unbias_values) takes the rows' 2^p out.
  float psum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int ta = 32 * t + 2 * i, tb = ta + 16, tc = ta + 1, td = tb + 1;
    const std::uint8_t* vrows = st + Tile::kValues + g * Tile::kLaneValueBytes;
    const uint2 va = load_run<Tile::kLaneValueBytes>(vrows + value_row(ta) * Tile::kValueRow);
    const uint2 vb = load_run<Tile::kLaneValueBytes>(vrows + value_row(tb) * Tile::kValueRow);
    const uint2 vc = load_run<Tile::kLaneValueBytes>(vrows + value_row(tc) * Tile::kValueRow);
    const uint2 vd = load_run<Tile::kLaneValueBytes>(vrows + value_row(td) * Tile::kValueRow);
    __half2 sab, zab, scd, zcd;
    if constexpr (!Tile::kFoldValues) {
      const int run = ((g * Tile::kLaneChannels) / VG) * Tile::kTokens;
      sab = half_pair(vs, run + ta, run + tb);
      zab = half_pair(vz, run + ta, run + tb);
      scd = half_pair(vs, run + tc, run + td);
      zcd = half_pair(vz, run + tc, run + td);
    }
    auto tile = [&](auto jc) {
      constexpr int j = decltype(jc)::value;
      if constexpr (j < KC) {
        std::uint32_t a[4];
        if constexpr (Tile::kFoldValues) {
          a[0] = biased_pair<VBITS, 2 * j>(va, vb);
          a[1] = biased_pair<VBITS, 2 * j + 1>(va, vb);
          a[2] = biased_pair<VBITS, 2 * j>(vc, vd);
          a[3] = biased_pair<VBITS, 2 * j + 1>(vc, vd);
        } else {
          a[0] = h2_bits(__hfma2(bits_h2(exact_pair<VBITS, 2 * j>(va, vb)), sab, zab));
          a[1] = h2_bits(__hfma2(bits_h2(exact_pair<VBITS, 2 * j + 1>(va, vb)), sab, zab));
          a[2] = h2_bits(__hfma2(bits_h2(exact_pair<VBITS, 2 * j>(vc, vd)), scd, zcd));
          a[3] = h2_bits(__hfma2(bits_h2(exact_pair<VBITS, 2 * j + 1>(vc, vd)), scd, zcd));
        }
        ptx::mma_16816<__half>(sm.acc[j], a, pb[i]);
      }
    };
    static_for<8>(tile);
    if constexpr (Tile::kFoldValues) {
      constexpr std::uint32_t one2 = 0x3c003c00u;  // fp16 (1, 1)
      const std::uint32_t ones[4] = {one2, one2, one2, one2};
      ptx::mma_16816<__half>(psum, ones, pb[i]);
    }
  }
  if constexpr (Tile::kFoldValues) {
    constexpr float off = -VCode::kOffset;
#pragma unroll
    for (int j = 0; j < KC; ++j) {
      sm.acc[j][0] = fmaf(off, psum[0], sm.acc[j][0]);
      sm.acc[j][1] = fmaf(off, psum[1], sm.acc[j][1]);
      sm.acc[j][2] = fmaf(off, psum[0], sm.acc[j][2]);
      sm.acc[j][3] = fmaf(off, psum[1], sm.acc[j][3]);
    }
  }
}

/// The end of a piece of blocks with folded values: acc held 2^p (codes . P) for rows g (lo,
/// p = bit(2j)) and g + 8 (hi, p = bit(2j + 1)) of channel tile j (biased_pair; each block took its
/// offset off); leaves codes . P.
template <int VBITS, int CT>
__device__ __forceinline__ void unbias_values(SoftmaxLanes<CT>& sm) {
  using VCode = BiasedCode<VBITS>;
#pragma unroll
  for (int j = 0; j < CT; ++j) {
    const float lo = VCode::unit(2 * j), hi = VCode::unit(2 * j + 1);
    sm.acc[j][0] *= lo;
    sm.acc[j][1] *= lo;
    sm.acc[j][2] *= hi;
    sm.acc[j][3] *= hi;
  }
}

/// Position p, channel ch (0 .. width - 1) of a stream: dequantized (fp32) when stored in a block
/// (per-channel lines: line = channel, per-token lines: line = block row), else the exact row.
template <int BITS, int GROUP, bool PER_CHANNEL>
__device__ __forceinline__ float stream_value(const PagedStream& s, int slot, int p, int quantized, int ch,
                                              std::size_t row_bytes) {
  if (p >= s.sinks && p < s.sinks + quantized) {
    const int i = p - s.sinks;
    const std::uint8_t* block = s.block_of(slot, i);
    const int row = i % s.block_tokens;
    const int line = PER_CHANNEL ? ch : row;
    const int at = PER_CHANNEL ? row : ch;  // code index within the line
    const std::uint8_t* codes = s.block.line_codes(block, line);
    const unsigned bit = static_cast<unsigned>(at) * BITS;
    const unsigned code = (codes[bit / 8] >> (bit % 8)) & ((1u << BITS) - 1u);
    const auto prm = s.block.load_group<Float16>(block, line, at / GROUP);
    return dequantize_value(code, prm.scale.to_float(), prm.zero.to_float());
  }
  return __half2float(reinterpret_cast<const __half*>(s.exact_row(slot, p, row_bytes))[ch]);
}

/// Channels ch .. ch + 7 of position p of a stream as 8 fp16 numbers: the exact row's 16 bytes,
/// the dequantized codes, or zeros past the sequence's end.
template <int BITS, int GROUP, bool PER_CHANNEL>
__device__ __forceinline__ uint4 stream_octet(const PagedStream& s, int slot, int p, int length, int quantized, int ch,
                                              std::size_t row_bytes) {
  if (p >= length) return make_uint4(0u, 0u, 0u, 0u);
  if (p < s.sinks || p >= s.sinks + quantized) {
    return *reinterpret_cast<const uint4*>(reinterpret_cast<const __half*>(s.exact_row(slot, p, row_bytes)) + ch);
  }
  uint4 r;
  __half* h = reinterpret_cast<__half*>(&r);
  if constexpr (!PER_CHANNEL && GROUP % 8 == 0) {
    // Per-token line: the 8 codes are 8 * BITS contiguous bits of row i's line, in one group.
    const int i = p - s.sinks;
    const std::uint8_t* block = s.block_of(slot, i);
    const int row = i % s.block_tokens;
    const std::uint8_t* codes = s.block.line_codes(block, row) + ch * BITS / 8;
    const std::uint32_t bits = BITS == 2 ? *reinterpret_cast<const std::uint16_t*>(codes) : *reinterpret_cast<const std::uint32_t*>(codes);
    const auto prm = s.block.load_group<Float16>(block, row, ch / GROUP);
    const float scale = prm.scale.to_float(), zero = prm.zero.to_float();
#pragma unroll
    for (int x = 0; x < 8; ++x) {
      h[x] = __float2half_rn(dequantize_value((bits >> (x * BITS)) & ((1u << BITS) - 1u), scale, zero));
    }
  } else {
#pragma unroll
    for (int x = 0; x < 8; ++x) h[x] = __float2half_rn(stream_value<BITS, GROUP, PER_CHANNEL>(s, slot, p, quantized, ch + x, row_bytes));
  }
  return r;
}

template <class TQ, int KBITS, int VBITS, int KG, int VG, int D>
__global__ void __launch_bounds__(kDecodeThreads, (KiviTile<KBITS, VBITS, KG, VG, D>::kMinBlocks))
    kivi_decode_kernel(const DecodeAttentionArgs args) {
  using Tile = KiviTile<KBITS, VBITS, KG, VG, D>;
  constexpr int KC = Tile::kChunks;
  extern __shared__ __align__(128) std::uint8_t smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int head = blockIdx.x, piece = blockIdx.y, entry = blockIdx.z;
  const int pieces = gridDim.y;
  const PagedKVParams& kv = args.kv;
  const int group = args.num_q_heads / kv.num_kv_heads;
  // Queries of the group: raw (folded keys rescale them per block) and times the softmax scale;
  // loaded first, so that their round trip overlaps the dependent loads of slot and counts.
  const float qscale = (args.scale > 0.0f ? args.scale : rsqrtf(static_cast<float>(D))) * kLog2e;
  const TQ* q = static_cast<const TQ*>(args.q) + (static_cast<std::size_t>(entry) * args.num_q_heads + head * group + g) * D;
  const bool valid = g < group;
  std::uint32_t qraw[KC][2];
#pragma unroll
  for (int kc = 0; kc < KC; ++kc) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int ca = 16 * kc + t + 8 * r;
      load_query_pair<TQ, __half>(q, valid, ca, ca + 4, 1.0f, qraw[kc][r]);
    }
  }
  const int slot = args.slots ? args.slots[entry] : entry;
  const int length = kv.lengths[slot];
  const int kq = kv.keys.quantized_tokens[slot], vq = kv.values.quantized_tokens[slot];
  const int full = min(kq, vq) / Tile::kTokens;
  const int splits = pieces - Tile::kTailPieces;  // pieces 0 .. kTailPieces - 1 are the tail (scheduled first)
  const int per = blocks_per_split(full, splits);
  // Tail piece k has work when chunk k (positions full * 128 + 64 k ..) starts before the end.
  const int tail_chunks = (length - full * Tile::kTokens + Tile::kTailTokens - 1) / Tile::kTailTokens;
  const PieceWork work = PieceWork::of(piece, min(Tile::kTailPieces, tail_chunks), Tile::kTailPieces,
                                       splits_with_work(full, per));
  if (work.index < 0) return;  // nothing to attend: the pieces with work merge without this one

  SoftmaxLanes<KC> sm;

  if (piece >= Tile::kTailPieces) {
    const int first = (piece - Tile::kTailPieces) * per, last = min(full, first + per);
    // One stage per warp: measured on the H200, a second stage (a ring of two, issued one block
    // ahead) gained nothing beyond the run-to-run spread, and where it costs thread blocks per SM
    // it was 9-37% slower (bench/gpu/NOTES.md).
    std::uint8_t* stage = smem + warp * Tile::kStage;
    auto* qfrag = reinterpret_cast<std::uint32_t*>(smem + Tile::kQueryFrags);
    if (warp == 0) {
#pragma unroll
      for (int kc = 0; kc < KC; ++kc) {
        qfrag[(2 * kc) * 32 + lane] = qraw[kc][0];
        qfrag[(2 * kc + 1) * 32 + lane] = qraw[kc][1];
      }
    }
    __syncthreads();
    for (int blk = first + warp; blk < last; blk += kDecodeWarps) {
      issue_keys<Tile>(stage, kv.keys.block_at(slot, blk), kv, head, lane);
      issue_values<Tile, VG, D>(stage, kv.values.block_at(slot, blk), kv, head, lane);
      ptx::cp_async_commit();
      ptx::cp_async_wait<0>();
      __syncwarp();
      attend_block<Tile, KBITS, VBITS, KG, VG, D>(stage, sm, qfrag, qscale, g, t);
      __syncwarp();
    }
    if constexpr (Tile::kFoldValues) unbias_values<VBITS>(sm);
  } else {
    // The rest: positions [full * 128, length), one chunk of 64 per tail piece, dequantized (or
    // copied) into shared memory, 8 channels an item, every load of a thread issued before its stores.
    __half* kt = reinterpret_cast<__half*>(smem);
    __half* vt = kt + Tile::kTailTokens * Tile::kTailKeyStride;
    const std::size_t row_bytes = kv.exact_row_bytes();
    // Tail piece k takes chunks k, k + 6, ... (a KIVI cache has at most 4; more are still attended).
    for (int base = full * Tile::kTokens + piece * Tile::kTailTokens; base < length;
         base += Tile::kTailPieces * Tile::kTailTokens) {
      __syncthreads();
      // Items in batches of 2 (4 uint4 in flight per thread), the batches not unrolled: the
      // per-channel dequantization of 8 channels is long, and this path sets the kernel's registers.
      constexpr int kItems = Tile::kTailTokens * D / 8 / kDecodeThreads;
      constexpr int kBatch = 2;
#pragma unroll 1
      for (int it0 = 0; it0 < kItems; it0 += kBatch) {
        uint4 kraw[kBatch], vraw[kBatch];
#pragma unroll
        for (int it = 0; it < kBatch; ++it) {
          const int e = threadIdx.x + (it0 + it) * kDecodeThreads;
          const int r = e / (D / 8), c8 = 8 * (e % (D / 8)), p = base + r;
          kraw[it] = stream_octet<KBITS, KG, true>(kv.keys, slot, p, length, kq, head * D + c8, row_bytes);
          vraw[it] = stream_octet<VBITS, VG, false>(kv.values, slot, p, length, vq, head * D + c8, row_bytes);
        }
#pragma unroll
        for (int it = 0; it < kBatch; ++it) {
          const int e = threadIdx.x + (it0 + it) * kDecodeThreads;
          const int r = e / (D / 8), c8 = 8 * (e % (D / 8));
          const __half* kh = reinterpret_cast<const __half*>(&kraw[it]);
          const __half* vh = reinterpret_cast<const __half*>(&vraw[it]);
#pragma unroll
          for (int x = 0; x < 8; ++x) {
            const int c = c8 + x;
            kt[r * Tile::kTailKeyStride + rho_column(c)] = kh[x];
            const int lg = c / Tile::kLaneChannels, rem = c % Tile::kLaneChannels;
            vt[((rem / 2) * 16 + (rem % 2) * 8 + lg) * Tile::kTailValueStride + r] = vh[x];
          }
        }
      }
      __syncthreads();
      const int row0 = base + 16 * warp;
      if (row0 < length) {
        float s4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        const __half* kr0 = kt + (16 * warp + g) * Tile::kTailKeyStride;
        const __half* kr1 = kr0 + 8 * Tile::kTailKeyStride;
#pragma unroll
        for (int kc = 0; kc < KC; ++kc) {
          std::uint32_t a[4];
          a[0] = *reinterpret_cast<const std::uint32_t*>(kr0 + 16 * kc + 2 * t);
          a[1] = *reinterpret_cast<const std::uint32_t*>(kr1 + 16 * kc + 2 * t);
          a[2] = *reinterpret_cast<const std::uint32_t*>(kr0 + 16 * kc + 2 * t + 8);
          a[3] = *reinterpret_cast<const std::uint32_t*>(kr1 + 16 * kc + 2 * t + 8);
          ptx::mma_16816<__half>(s4, a, qraw[kc]);
        }
#pragma unroll
        for (int x = 0; x < 4; ++x) s4[x] *= qscale;
        std::uint32_t pb[2];
        softmax_tile<__half>(sm, s4, row0, g, length, pb);
#pragma unroll
        for (int j = 0; j < KC; ++j) {
          const __half* v0 = vt + (16 * j + g) * Tile::kTailValueStride + 16 * warp + 2 * t;
          const __half* v1 = v0 + 8 * Tile::kTailValueStride;
          const std::uint32_t a[4] = {*reinterpret_cast<const std::uint32_t*>(v0), *reinterpret_cast<const std::uint32_t*>(v1),
                                      *reinterpret_cast<const std::uint32_t*>(v0 + 8),
                                      *reinterpret_cast<const std::uint32_t*>(v1 + 8)};
          ptx::mma_16816<__half>(sm.acc[j], a, pb);
        }
      }
    }
  }
  finish_piece<TQ, D, KC>(args, sm, smem, entry, head, work, pieces, group, [](int lg, int j, int h) {
    return lg * Tile::kLaneChannels + 2 * j + h;
  });
}

}  // namespace detail
}  // namespace cuda
}  // namespace kvq
