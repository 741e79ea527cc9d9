// SPDX-License-Identifier: Apache-2.0
// Every registered policy on a real KV cache: stories260K (llama2.c, 5 layers, 4 kv heads of 8
// channels) run by the kvq tool's Llama runtime (tools/llm), teacher-forced on TinyStories. The
// runtime is proven in test_realdata_runtime.cpp (greedy decoding equals llama2.c's reference
// output byte for byte, the tokenizer round-trips the text, fp32 perplexity matches the data's
// README); here each policy's decode attention over the real keys and values is checked against
// exact attention with an error bound derived below, and its perplexity is printed.
//
// Data: KVQ_REALDATA_DIR (tests/realdata/CMakeLists.txt); the executable skips (exit 77) when
// the folder is absent.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "kvq/attention/decode_attention.hpp"
#include "kvq/core/thread_pool.hpp"
#include "kvq/policy/registry.hpp"
#include "kvq/transform/rope.hpp"
#include "kvq_catch.hpp"
#include "llm/calibration.hpp"
#include "llm/evaluate.hpp"
#include "llm/load.hpp"
#include "llm/session.hpp"
#include "llm/text.hpp"

namespace {

namespace llm = kvq::llm;
using kvq::index_t;

constexpr int kWindow = 256;   // text tokens per perplexity window (each window starts with BOS)
constexpr int kWindows = 2;    // the data README's fp32 reference: 2 windows of 256 from BOS

/// The model and the evaluation windows of the first kWindow * kWindows tokens of TinyStories,
/// loaded once.
struct RealData {
  llm::LoadedModel loaded;
  llm::EvalPlan plan;  // kWindows windows of BOS + kWindow text tokens

  const llm::Model& model() const noexcept { return loaded.model; }

  static const RealData& get() {
    static const RealData d = [] {
      const std::string dir = KVQ_REALDATA_DIR;
      RealData r{llm::load_model(dir + "/stories260K/stories260K.bin"), {}};
      const llm::Tokenizer& tok = *r.loaded.tokenizer;
      const std::vector<int> text =
          llm::leading_tokens(tok, dir + "/tinystories/tinystories_val_head.txt", kWindow * kWindows);
      r.plan = llm::make_plan(text, kWindow * kWindows, kWindow + 1, tok.bos(), tok.add_bos());
      return r;
    }();
    return d;
  }
};

/// Teacher-forced perplexity with the policy's cache (decode semantics: every token is a decode
/// step attending over the cache as it stands, llm/evaluate.hpp): over all windows, and over the
/// first window only.
template <class Policy>
std::pair<double, double> perplexity(const RealData& d, kvq::ThreadPool& pool) {
  const llm::PolicyResult r = llm::evaluate<Policy>(d.model(), d.plan, 64, &pool);
  // logprobs: one per fed token, NaN for each window's first; window 0 is logprobs[0, kWindow].
  double nll = 0;
  for (int i = 1; i <= kWindow; ++i) nll -= r.logprobs[static_cast<std::size_t>(i)];
  return {r.perplexity(), std::exp(nll / kWindow)};
}

// ---- policies on the real cache ------------------------------------------------------------

/// The attention inputs of one layer for one position, [layers, width] each.
struct StepTrace {
  std::vector<float> q;      // after RoPE
  std::vector<float> k;      // after RoPE
  std::vector<float> k_pre;  // before RoPE
  std::vector<float> v;
};

/// The attention inputs of one teacher-forced pass with the fp32 cache: per position, every
/// layer's rotated query, keys before and after RoPE and values. Post-RoPE keys are rotated by a
/// RopeRotator exactly as the session rotates the keys it appends (bit for bit the same rows).
const std::vector<StepTrace>& fp32_trace() {
  static const std::vector<StepTrace> trace = [] {
    const RealData& d = RealData::get();
    const llm::ModelConfig& c = d.model().config;
    const auto layers = static_cast<std::size_t>(c.num_layers);
    std::vector<StepTrace> steps(static_cast<std::size_t>(kWindow));
    for (StepTrace& s : steps) {
      s.q.resize(layers * static_cast<std::size_t>(c.q_dim()));
      s.k.resize(layers * static_cast<std::size_t>(c.kv_dim()));
      s.k_pre.resize(s.k.size());
      s.v.resize(s.k.size());
    }
    const kvq::RopeRotator rope(c.head_dim, c.rope, 1);
    double scratch[2 * kvq::RopeRotator::kMaxHalf];
    llm::Session<kvq::Fp16Policy<float>> session(d.model(), kWindow, nullptr);
    session.set_observer([&](const llm::AttentionInputs& in) {
      StepTrace& s = steps[static_cast<std::size_t>(in.position)];
      const auto l = static_cast<std::size_t>(in.layer);
      const auto qd = static_cast<std::size_t>(c.q_dim());
      const auto kvd = static_cast<std::size_t>(c.kv_dim());
      std::copy_n(in.q, qd, s.q.data() + l * qd);
      std::copy_n(in.k_pre_rope, kvd, s.k_pre.data() + l * kvd);
      std::copy_n(in.v, kvd, s.v.data() + l * kvd);
      float* k = s.k.data() + l * kvd;
      std::copy_n(in.k_pre_rope, kvd, k);
      rope.rotate(k, 1, c.kv_dim(), c.num_kv_heads, in.position, scratch);
    });
    session.forward(d.plan.windows.front().data(), kWindow, nullptr, false);
    return steps;
  }();
  return trace;
}

struct PolicyRow {
  std::string name;
  double bits = 0;          // measured bits per element of the cache at kWindow tokens
  double max_elem = -1;     // largest |read_keys/read_values - input| / a-priori bound, quantized
                            // elements (-1: none; exact rows meet their bound with equality)
  long elem_violations = 0; // stored elements beyond their a-priori bound
  double max_err = 0;       // max |out - exact| over every checked element
  double rel_err = 0;       // ||out - exact||_2 / ||exact||_2 over every checked output
  double max_bound = 0;     // largest attention bound of any element
  double worst_ratio = 0;   // max |out - exact| / bound
  double typical_ratio = 0; // sum |out - exact| / sum bound
  long violations = 0;      // attention outputs whose error exceeds the bound
  double ppl = 0;           // perplexity with the policy's cache driving the model
  double ppl_first = 0;     // first window only
};

// ---- step 1: a-priori error of every stored element ------------------------------------------
//
// For a token row x (as appended: keys after RoPE, or before for pre-RoPE policies) the cache
// stores r = x rounded to its exact type (fp32: r = x). Sinks and window rows are r, so
// delta = |r - x|, computed exactly. Quantized rows are groups of the stream's input z (z = r, or
// the CSKV latent z = r·A); a group with minimum mn and maximum mx, clip ratio alpha and stored
// scale s (read back from the block's metadata) dequantizes every member within s/2 of
// clamp(z, alpha·mn, alpha·mx) (quant/params.hpp: zero is rounded down and the scale up, so the
// grid covers the clipping range), so
//   delta_z = s/2 + dist(z, [alpha·mn, alpha·mx]) + a float allowance,
// and delta = delta_z + |r - x|. CSKV reconstructs x^ = z^·B, so per channel
//   delta_c = sum_i delta_z_i |B_ic| + |(r·A·B)_c - x_c| (the low-rank truncation, exact)
// plus a float allowance. The allowance is 2^-14 of the magnitudes involved (max |z| of the
// group; sum_j |r_j A_ji| for a latent; sum_i |z_i B_ic| for a reconstruction): far above fp32
// rounding of these <= 32-term sums, far below any quantization step of at most 8 bits.
// Only the scales come from the cache: membership of groups follows the documented layout
// (per-token groups of channels, SKVQ's channel groups; per-channel groups of group_size
// consecutive quantized tokens of a block).

/// A-priori bounds of one stream of one layer, kept up to date as tokens are appended (a row's
/// bound is computed when it enters the cache and again when it is quantized).
template <class Policy>
class StreamBounds {
  using Cache = kvq::QuantizedKVCache<Policy>;
  using E = typename Cache::exact_type;

 public:
  StreamBounds(const Cache& cache, index_t layer, bool is_key) : cache_(cache), layer_(layer), is_key_(is_key) {}

  /// Appends the input row of the next token and refreshes every row whose segment changed.
  void update(kvq::SequenceId seq, const float* input) {
    const index_t w = cache_.width();
    inputs_.emplace_back(input, input + w);
    rounded_.emplace_back(static_cast<std::size_t>(w));
    for (index_t c = 0; c < w; ++c) {
      rounded_.back()[static_cast<std::size_t>(c)] = kvq::to_float(kvq::from_float<E>(input[c]));
    }
    delta_.emplace_back(static_cast<std::size_t>(w));
    quantized_.push_back(false);
    const kvq::StreamView<E> v = is_key_ ? cache_.key_view(seq, layer_) : cache_.value_view(seq, layer_);
    REQUIRE(v.length() == static_cast<index_t>(inputs_.size()));
    const index_t t_new = v.length() - 1;
    exact_row(t_new);
    for (index_t t = 0; t < v.length(); ++t) {
      if (!quantized_[static_cast<std::size_t>(t)] && v.segment(t) == kvq::Segment::kQuantized) {
        quantized_row(v, t);
        quantized_[static_cast<std::size_t>(t)] = true;
      }
    }
  }

  const std::vector<double>& delta(index_t t) const { return delta_[static_cast<std::size_t>(t)]; }
  /// True when token t's row is stored quantized (not exactly).
  bool quantized(index_t t) const {
    return quantized_[static_cast<std::size_t>(t)] && (is_key_ ? cache_.key_layout() : cache_.value_layout()).quantized;
  }
  const std::vector<float>& input(index_t t) const { return inputs_[static_cast<std::size_t>(t)]; }

 private:
  static constexpr double kAllowance = 1.0 / 16384;  // 2^-14

  void exact_row(index_t t) {
    const auto i = static_cast<std::size_t>(t);
    for (std::size_t c = 0; c < delta_[i].size(); ++c) {
      delta_[i][c] = std::abs(static_cast<double>(rounded_[i][c]) - inputs_[i][c]);
    }
  }

  /// The stream's input z of token t: the rounded row, or its latent r·A.
  const std::vector<double>& z_row(index_t t) {
    if (z_.size() <= static_cast<std::size_t>(t)) z_.resize(static_cast<std::size_t>(t) + 1);
    std::vector<double>& z = z_[static_cast<std::size_t>(t)];
    if (z.empty()) {
      const std::vector<float>& r = rounded_[static_cast<std::size_t>(t)];
      if constexpr (kvq::policy_traits<Policy>::latent) {
        const kvq::StreamTransform f = is_key_ ? cache_.key_transform(layer_) : cache_.value_transform(layer_);
        const index_t rank = f.stored_width;
        const float* a = f.down;
        z.assign(static_cast<std::size_t>(rank), 0.0);
        magnitude_.resize(z_.size());
        std::vector<double>& m = magnitude_[static_cast<std::size_t>(t)];
        m.assign(z.size(), 0.0);
        for (index_t i = 0; i < rank; ++i) {
          double sum = 0, mag = 0;
          for (index_t j = 0; j < f.width; ++j) {
            const double term =
                static_cast<double>(r[static_cast<std::size_t>(j)]) * a[static_cast<std::size_t>(j * rank + i)];
            sum += term;
            mag += std::abs(term);
          }
          z[static_cast<std::size_t>(i)] = sum;
          m[static_cast<std::size_t>(i)] = mag;
        }
      } else {
        z.assign(r.begin(), r.end());
      }
    }
    return z;
  }

  /// The stored scale at metadata index `index` of the block holding quantized row q.
  static double stored_scale(const kvq::StreamView<E>& v, index_t q, index_t index) {
    const kvq::StreamLayout& l = *v.layout;
    const std::uint8_t* block = v.pool->data(v.blocks[q / l.block_tokens]);
    return kvq::dispatch_meta(l.spec.meta, [&](auto meta) {
      using Meta = decltype(meta);
      Meta s;
      std::memcpy(&s, l.block.scales(block) + static_cast<std::size_t>(index) * sizeof(Meta), sizeof(Meta));
      return static_cast<double>(s.to_float());
    });
  }

  void quantized_row(const kvq::StreamView<E>& v, index_t t) {
    const kvq::StreamLayout& l = *v.layout;
    if (!l.quantized && !v.transform.projects()) return;  // exact rows (Fp16Policy): stored as r, like sinks and windows
    const index_t rank = l.width;
    const index_t q = t - v.sink_count();
    const index_t row = q % l.block_tokens;
    const double clip = v.transform.clip;
    const std::vector<double> z = z_row(t);
    std::vector<double> dz(static_cast<std::size_t>(rank));
    std::vector<index_t> members;
    for (index_t i = 0; l.quantized && i < rank; ++i) {
      std::vector<double> values;
      index_t index = 0;
      if (l.spec.axis == kvq::GroupAxis::kChannels) {  // per-token groups of channels
        index_t g = 0, begin = 0, length = l.spec.group_size;
        if (v.transform.groups.empty()) {
          g = i / l.spec.group_size;
          begin = g * length;
        } else {
          index_t slot = 0;
          while (v.transform.groups.permutation[static_cast<std::size_t>(slot)] != i) ++slot;
          while (v.transform.groups.boundaries[static_cast<std::size_t>(g) + 1] <= slot) ++g;
          begin = v.transform.groups.boundaries[static_cast<std::size_t>(g)];
          length = v.transform.groups.boundaries[static_cast<std::size_t>(g) + 1] - begin;
        }
        for (index_t s = begin; s < begin + length; ++s) {
          const index_t c = v.transform.groups.empty() ? s : v.transform.groups.permutation[static_cast<std::size_t>(s)];
          values.push_back(z[static_cast<std::size_t>(c)]);
        }
        index = static_cast<index_t>(l.block.meta_index(row, g));
      } else {  // per-channel groups of group_size consecutive quantized tokens
        const index_t gs = l.spec.group_size;
        const index_t first = t - q % gs;
        for (index_t u = first; u < first + gs; ++u) values.push_back(z_row(u)[static_cast<std::size_t>(i)]);
        index = static_cast<index_t>(l.block.meta_index(i, row / gs));
      }
      const double mn = *std::min_element(values.begin(), values.end());
      const double mx = *std::max_element(values.begin(), values.end());
      double big = 0;
      for (double x : values) big = std::max(big, std::abs(x));
      const double zi = z[static_cast<std::size_t>(i)];
      const double outside = std::max({0.0, clip * mn - zi, zi - clip * mx});
      double allowance = kAllowance * big;
      if constexpr (kvq::policy_traits<Policy>::latent) {
        allowance += kAllowance * magnitude_[static_cast<std::size_t>(t)][static_cast<std::size_t>(i)];
      }
      dz[static_cast<std::size_t>(i)] = stored_scale(v, q, index) / 2 + outside + allowance;
    }
    if (!l.quantized) {
      // Latents stored exactly (CskvFp16Policy): rounding to fp16 moves z_i by at most half an
      // ulp, 2^-11 |z_i| (2^-25 below fp16's normal range).
      for (index_t i = 0; i < rank; ++i) {
        const double zi = std::abs(z[static_cast<std::size_t>(i)]);
        dz[static_cast<std::size_t>(i)] = std::max(zi * std::ldexp(1.0, -11), std::ldexp(1.0, -25)) +
                                          kAllowance * (zi + magnitude_[static_cast<std::size_t>(t)][static_cast<std::size_t>(i)]);
      }
    }
    std::vector<double>& d = delta_[static_cast<std::size_t>(t)];
    const std::vector<float>& x = inputs_[static_cast<std::size_t>(t)];
    if constexpr (kvq::policy_traits<Policy>::latent) {
      const kvq::StreamTransform f = is_key_ ? cache_.key_transform(layer_) : cache_.value_transform(layer_);
      const float* b = f.up;
      for (index_t c = 0; c < f.width; ++c) {
        double spread = 0, rec = 0, mag = 0;
        for (index_t i = 0; i < rank; ++i) {
          const double bic = b[static_cast<std::size_t>(i * f.width + c)];
          spread += dz[static_cast<std::size_t>(i)] * std::abs(bic);
          rec += z[static_cast<std::size_t>(i)] * bic;
          mag += std::abs(z[static_cast<std::size_t>(i)] * bic);
        }
        d[static_cast<std::size_t>(c)] = spread + std::abs(rec - x[static_cast<std::size_t>(c)]) + kAllowance * mag;
      }
    } else {
      const std::vector<float>& r = rounded_[static_cast<std::size_t>(t)];
      for (std::size_t c = 0; c < d.size(); ++c) d[c] = dz[c] + std::abs(static_cast<double>(r[c]) - x[c]);
    }
  }

  const Cache& cache_;
  index_t layer_;
  bool is_key_;
  std::vector<std::vector<float>> inputs_;    // as appended
  std::vector<std::vector<float>> rounded_;   // rounded to the exact type
  std::vector<std::vector<double>> delta_;    // a-priori |stored - input| per element
  std::vector<std::vector<double>> z_;        // stream inputs (latents for CSKV), lazily
  std::vector<std::vector<double>> magnitude_;  // sum_j |r_j A_ji| per latent (CSKV)
  std::vector<bool> quantized_;
};

// ---- step 2: the attention bound ---------------------------------------------------------
//
// For one query head q (scaled by 1/sqrt(d)), exact keys k_t (after RoPE) and values v_t over
// tokens t < n, exact weights p = softmax(q·k), and the keys and values attention reads,
// k^_t = k_t + e_t and v^_t = v_t + f_t with |e_tc| and |f_tc| bounded by step 1's delta (for
// pre-RoPE keys the error turns with its key; a rotation keeps each pair's norm, so
// |q_pair · (R e)_pair| <= |q_pair| sqrt(da^2 + db^2)):
//   scores:   s^_t = s_t + D_t with |D_t| <= eps_t := sum_c |q_c| delta_tc.
//   softmax:  p^_t = p_t e^{D_t} / Z with Z = sum_u p_u e^{D_u} in [Z-, Z+] := [sum p_u e^{-eps_u},
//             sum p_u e^{eps_u}], so p^_t lies in [p_t e^{-eps_t} / Z+, min(1, p_t e^{eps_t} / Z-)]
//             =: [p^-_t, p^+_t], so |p^_t - p_t| <= b_t (the farther end; computed in log space).
//             The total variation TV = sum_t (p^_t - p_t)^+ = sum_t (p_t - p^_t)^+ is then at most
//             sum_t (p^+_t - p_t)^+, sum_t (p_t - p^-_t)^+, and tanh(max_t eps_t / 2) (one eps for
//             all tokens: the weights change by factors within [1, e^{2 eps}] up to normalisation,
//             and the two-point distribution is the worst case).
//   output:   out^_c - out_c = sum_t p^_t f_tc + sum_t (p^_t - p_t)(v_tc - m_c) for any m_c (both
//             weight vectors sum to 1); with m_c the mid-range of v_.c,
//             |out^_c - out_c| <= min(max_t delta^v_tc, sum_t p^+_t delta^v_tc)
//                                 + min(TV (max_t v_tc - min_t v_tc), sum_t b_t |v_tc - m_c|).
// The per-token terms keep the bound informative when a few quantized tokens have large score
// errors but little weight; the TV term keeps it from adding up many small changes.
// The fused kernel computes in fp32: its score rounding (8-term dots, query scaling, RoPE of the
// stored keys in float, and the reference keys' own float RoPE) is allowed for by adding
// 16u sum_c |q_c| (|k_tc| + delta_tc) + 4e-7 (exp_nonpositive's relative error) to eps_t, and
// its accumulation of n weighted values and the normalisation by (n + 16) u max_t |v^_tc|, with
// u = 2^-24.
template <class Policy>
PolicyRow policy_row(const RealData& d, kvq::ThreadPool& pool) {
  using Cache = kvq::QuantizedKVCache<Policy>;
  const llm::ModelConfig& cfg = d.model().config;
  const std::vector<StepTrace>& trace = fp32_trace();
  const index_t dim = cfg.head_dim;
  const index_t width = cfg.kv_dim();
  const index_t group = cfg.num_heads / cfg.num_kv_heads;
  const double u = std::ldexp(1.0, -24);
  const double inv_sqrt_d = 1.0 / std::sqrt(static_cast<double>(dim));

  Cache cache(llm::Session<Policy>::cache_config(cfg, kWindow), llm::default_calibration<Policy>(d.model()));
  const kvq::SequenceId seq = cache.add_sequence();
  std::vector<StreamBounds<Policy>> key_bounds, value_bounds;
  for (int l = 0; l < cfg.num_layers; ++l) {
    key_bounds.emplace_back(cache, l, true);
    value_bounds.emplace_back(cache, l, false);
  }
  PolicyRow row;
  row.name = Policy::name();
  double err2 = 0, ref2 = 0, err_sum = 0, bound_sum = 0;
  std::vector<float> keys(static_cast<std::size_t>(kWindow * width));
  std::vector<float> values(keys.size());
  std::vector<float> out(static_cast<std::size_t>(cfg.num_heads * dim));
  // Per token of one query head: eps_t, log p_t, p_t, p^+_t and b_t (see above).
  std::vector<double> eps(static_cast<std::size_t>(kWindow)), logp(eps.size()), prob(eps.size()),
      prob_hi(eps.size()), change(eps.size());
  for (int p = 0; p < kWindow; ++p) {
    const StepTrace& step = trace[static_cast<std::size_t>(p)];
    for (int l = 0; l < cfg.num_layers; ++l) {
      const float* k = (Policy::pre_rope ? step.k_pre.data() : step.k.data()) + l * width;
      cache.append(seq, l, k, step.v.data() + l * width, 1);
      key_bounds[static_cast<std::size_t>(l)].update(seq, k);
      value_bounds[static_cast<std::size_t>(l)].update(seq, step.v.data() + l * width);
    }
    // Every position is checked: windows, sinks, flushes and block boundaries all occur.
    const index_t n = p + 1;
    for (int l = 0; l < cfg.num_layers; ++l) {
      const StreamBounds<Policy>& kb = key_bounds[static_cast<std::size_t>(l)];
      const StreamBounds<Policy>& vb = value_bounds[static_cast<std::size_t>(l)];
      // Step 1's bounds hold for what the cache returns.
      cache.read_keys(seq, l, keys.data());
      cache.read_values(seq, l, values.data());
      for (index_t t = 0; t < n; ++t) {
        for (index_t c = 0; c < width; ++c) {
          const auto i = static_cast<std::size_t>(t * width + c);
          const auto ci = static_cast<std::size_t>(c);
          for (const auto& [read, b] : {std::pair<const float*, const StreamBounds<Policy>*>{keys.data(), &kb},
                                        {values.data(), &vb}}) {
            const double e = std::abs(static_cast<double>(read[i]) - b->input(t)[ci]);
            const double bound = b->delta(t)[ci];
            row.elem_violations += e > bound;
            if (b->quantized(t)) row.max_elem = std::max(row.max_elem, e / bound);
          }
        }
      }
      const index_t qshape[2] = {cfg.num_heads, dim};
      kvq::attend(cache, seq, l, kvq::StridedView<const float, 2>(step.q.data() + l * cfg.q_dim(), qshape),
                  kvq::StridedView<float, 2>(out.data(), qshape));
      auto exact_k = [&](index_t t, index_t c) {
        return static_cast<double>(trace[static_cast<std::size_t>(t)].k[static_cast<std::size_t>(l * width + c)]);
      };
      auto exact_v = [&](index_t t, index_t c) {
        return static_cast<double>(trace[static_cast<std::size_t>(t)].v[static_cast<std::size_t>(l * width + c)]);
      };
      for (index_t qh = 0; qh < cfg.num_heads; ++qh) {
        const index_t h = qh / group;
        const float* q = step.q.data() + l * cfg.q_dim() + qh * dim;
        double mx = -INFINITY;
        for (index_t t = 0; t < n; ++t) {
          const std::vector<double>& dk = kb.delta(t);
          double se = 0, sk = 0, dot = 0;
          for (index_t c = 0; c < dim; c += 2) {
            const double qa = q[c] * inv_sqrt_d;
            const double qb = q[c + 1] * inv_sqrt_d;
            const double da = dk[static_cast<std::size_t>(h * dim + c)];
            const double db = dk[static_cast<std::size_t>(h * dim + c + 1)];
            se += Policy::pre_rope ? std::hypot(qa, qb) * std::hypot(da, db) : std::abs(qa) * da + std::abs(qb) * db;
            sk += std::abs(qa) * (std::abs(exact_k(t, h * dim + c)) + da) +
                  std::abs(qb) * (std::abs(exact_k(t, h * dim + c + 1)) + db);
            dot += qa * exact_k(t, h * dim + c) + qb * exact_k(t, h * dim + c + 1);
          }
          eps[static_cast<std::size_t>(t)] = se + 16 * u * sk + 4e-7;
          logp[static_cast<std::size_t>(t)] = dot;
          mx = std::max(mx, dot);
        }
        // log p_t, then log Z- and log Z+ (log-sum-exp), then p_t, b_t and p^+_t.
        auto log_sum_exp = [&](double sign) {
          double m = -INFINITY, sum = 0;
          for (std::size_t t = 0; t < static_cast<std::size_t>(n); ++t) m = std::max(m, logp[t] + sign * eps[t]);
          for (std::size_t t = 0; t < static_cast<std::size_t>(n); ++t) sum += std::exp(logp[t] + sign * eps[t] - m);
          return m + std::log(sum);
        };
        double total = 0;
        for (index_t t = 0; t < n; ++t) total += std::exp(logp[static_cast<std::size_t>(t)] - mx);
        for (index_t t = 0; t < n; ++t) logp[static_cast<std::size_t>(t)] -= mx + std::log(total);
        const double log_z_lo = log_sum_exp(-1.0);
        const double log_z_hi = log_sum_exp(+1.0);
        double up = 0, down = 0, eps_max = 0;
        for (index_t t = 0; t < n; ++t) {
          const auto i = static_cast<std::size_t>(t);
          prob[i] = std::exp(logp[i]);
          const double hi = std::exp(std::min(0.0, logp[i] + eps[i] - log_z_lo));
          const double lo = std::exp(logp[i] - eps[i] - log_z_hi);
          prob_hi[i] = hi;
          change[i] = std::max(hi - prob[i], prob[i] - lo);
          up += std::max(0.0, hi - prob[i]);
          down += std::max(0.0, prob[i] - lo);
          eps_max = std::max(eps_max, eps[i]);
        }
        const double tv = std::min({std::tanh(eps_max / 2), up, down});
        for (index_t c = h * dim; c < (h + 1) * dim; ++c) {
          double exact = 0, dv = 0, dv_weighted = 0, vmax = -INFINITY, vmin = INFINITY, vread = 0;
          for (index_t t = 0; t < n; ++t) {
            const auto i = static_cast<std::size_t>(t);
            const double v = exact_v(t, c);
            const double f = vb.delta(t)[static_cast<std::size_t>(c)];
            exact += prob[i] * v;
            dv = std::max(dv, f);
            dv_weighted += prob_hi[i] * f;
            vmax = std::max(vmax, v);
            vmin = std::min(vmin, v);
            vread = std::max(vread, std::abs(v) + f);
          }
          const double mid = (vmax + vmin) / 2;
          double spread = 0;
          for (index_t t = 0; t < n; ++t) spread += change[static_cast<std::size_t>(t)] * std::abs(exact_v(t, c) - mid);
          const double bound = std::min(dv, dv_weighted) + std::min(tv * (vmax - vmin), spread) +
                               static_cast<double>(n + 16) * u * vread;
          const double got = out[static_cast<std::size_t>(qh * dim + c - h * dim)];
          const double err = std::abs(got - exact);
          row.max_err = std::max(row.max_err, err);
          row.max_bound = std::max(row.max_bound, bound);
          row.worst_ratio = std::max(row.worst_ratio, err / bound);
          row.violations += err > bound;
          err2 += err * err;
          ref2 += exact * exact;
          err_sum += err;
          bound_sum += bound;
        }
      }
    }
  }
  row.bits = cache.bits_per_element();
  row.rel_err = std::sqrt(err2 / ref2);
  row.typical_ratio = err_sum / bound_sum;
  std::tie(row.ppl, row.ppl_first) = perplexity<Policy>(d, pool);
  return row;
}

TEST_CASE("stories260K: every registered policy's attention error on the real KV cache is below "
          "its derived bound",
          "[realdata]") {
  const RealData& d = RealData::get();
  kvq::ThreadPool pool(2);  // the perplexity runs (their results do not depend on threads)
  std::vector<PolicyRow> rows;
  kvq::for_each_policy([&](auto tag) {
    using P = typename decltype(tag)::type;
    INFO("policy " << P::name());
    rows.push_back(policy_row<P>(d, pool));
  });
  auto row_of = [&](const std::string& name) -> const PolicyRow& {
    const auto it = std::find_if(rows.begin(), rows.end(), [&](const PolicyRow& r) { return r.name == name; });
    REQUIRE(it != rows.end());
    return *it;
  };
  const double fp32_ppl = row_of("fp32").ppl;
  std::printf("\nstories260K on TinyStories: decode attention at every position 0..%d of a %d-token window, "
              "5 layers x 8 query heads x 8 channels,\nvs exact fp64 attention over the fp32 K/V. elem/bound: "
              "largest quantized-element error over its a-priori bound; err/bound: the same for attention outputs\n"
              "(max: the worst element, at one token it is the value error itself; sum: sum of errors / sum of "
              "bounds).\n"
              "bits/elem measured at %d tokens (windows and sinks included); PPL over %d tokens (%d windows of %d "
              "from BOS), PPL(w0) the first window.\n",
              kWindow - 1, kWindow, kWindow, kWindow * kWindows, kWindows, kWindow);
  std::printf("%-26s %9s %10s %10s %10s %10s %9s %9s %9s %9s %9s\n", "policy", "bits/elem", "elem/bound",
              "max |err|", "rel err", "max bound", "err/b max", "err/b sum", "PPL", "dPPL%", "PPL(w0)");
  for (const PolicyRow& r : rows) {
    std::printf("%-26s %9.4f %10s %10.3e %10.3e %10.3e %9.4f %9.4f %9.4f %+9.3f %9.4f\n", r.name.c_str(), r.bits,
                r.max_elem < 0 ? "-" : std::to_string(r.max_elem).substr(0, 6).c_str(), r.max_err, r.rel_err, r.max_bound, r.worst_ratio, r.typical_ratio, r.ppl,
                100.0 * (r.ppl / fp32_ppl - 1.0), r.ppl_first);
  }
  for (const PolicyRow& r : rows) {
    INFO("policy " << r.name << ": " << r.elem_violations << " stored elements beyond their bound (worst ratio "
                   << r.max_elem << "), " << r.violations << " attention outputs beyond their bound (worst ratio "
                   << r.worst_ratio << ")");
    CHECK(r.elem_violations == 0);
    CHECK(r.violations == 0);
    CHECK(std::isfinite(r.ppl));
  }
  CHECK(std::abs(row_of("fp16").ppl / row_of("fp32").ppl - 1.0) < 0.01);
  // KIVI's finding holds on this model, by a wide margin: per-channel keys beat per-token keys at
  // 2 bits (its keys have outlier channels of magnitude 20-30 next to channels of 2-5): KIVI
  // stays within 10% of fp32's perplexity in less than half its memory, while per-token keys
  // more than double KIVI's perplexity.
  const PolicyRow& kivi2 = row_of("kivi-k2v2-g32-r128");
  const PolicyRow& per_token2 = row_of("pertoken-k2v2-g32");
  CHECK(kivi2.ppl < fp32_ppl * 1.10);
  CHECK(per_token2.ppl > 2.0 * kivi2.ppl);
  CHECK(kivi2.bits < row_of("fp32").bits / 2);
}

}  // namespace
