// SPDX-License-Identifier: Apache-2.0
// Policy types: what each stores (streams, windows, sinks, latent ranks) against ALGORITHMS.md
// as written down in cache_testing.hpp, policy_traits / is_kv_policy, names, and the registry
// (names, order, dispatch, unknown names). The static_asserts that reject invalid policies are
// pinned by the compile-fail tests registered next to this file.
#include <set>
#include <string>
#include <type_traits>
#include <vector>

#include "cache_testing.hpp"
#include "kvq_catch.hpp"
#include "seeds.hpp"

namespace {

using kvq::Bits;
using kvq::GroupAxis;
using kvq::index_t;
using kvq::MetaFormat;
using kvq_test::Expect;

using namespace kvq_test::policies;  // KiviK2, SkvqSmall, ...

using SkvqVariant = kvq::SkvqPolicy<Bits::k8, Bits::k3, 16, 5, 0, 960, MetaFormat::kBf16, false>;

// The registry is exactly the list of compiled-in policies, in order.
static_assert(std::is_same_v<kvq::RegisteredPolicies,
                             kvq::PolicyList<Fp16, Bf16, Fp32, KiviK2, KiviK4, SkvqK2V15, SkvqK2V2, SkvqK2V15G32,
                                             SkvqK2V2G32, SkvqK2V15G8, SkvqK2V2G8, CskvK4V4, CskvK2V4, CskvK4V4R25,
                                             CskvK4V4R10, CskvFp16R25, CskvFp16R10, PerTokenK2, PerTokenK4>>,
              "registry changed: update this test and the README's policy table");

// policy_traits / is_kv_policy.
struct Empty {};
static_assert(!kvq::is_kv_policy_v<int>);
static_assert(!kvq::is_kv_policy_v<Empty>);
static_assert(kvq::is_kv_policy_v<KiviK2> && kvq::is_kv_policy_v<SkvqVariant> && kvq::is_kv_policy_v<CskvSmall> &&
              kvq::is_kv_policy_v<Fp32> && kvq::is_kv_policy_v<PerTokenK4>);
#if defined(__cpp_concepts) && __cpp_concepts >= 201907L
static_assert(kvq::KVPolicy<KiviK2> && !kvq::KVPolicy<Empty>);
#endif

/// Compares a policy's compiled-in stream description with the expectation.
template <class S>
void require_stream(const kvq_test::StreamExpect& want, index_t heads, index_t dim) {
  REQUIRE(S::quantized == want.quantized);
  if constexpr (S::quantized) {
    CAPTURE(kvq::bits_label(S::bits), kvq::axis_label(S::axis), S::group_size, S::clip, kvq::meta_label(S::meta));
    REQUIRE(S::bits == want.spec.bits);
    REQUIRE(S::axis == want.spec.axis);
    const index_t group = S::group_size == kvq::kGroupPerHead ? want.spec.group_size : S::group_size;
    REQUIRE(group == want.spec.group_size);
    REQUIRE(S::clip == want.spec.clip);
    REQUIRE(S::meta == want.spec.meta);
    REQUIRE((S::transform::kind == kvq::TransformKind::kChannelReorder) == want.reorders);
    (void)heads;
    (void)dim;
  } else {
    REQUIRE(sizeof(typename S::value_type) == want.exact_bytes);
  }
}

template <class P>
void require_policy_matches_algorithms() {
  using X = Expect<P>;
  using T = kvq::policy_traits<P>;
  CAPTURE(P::name());
  REQUIRE(P::name() == X::name());
  REQUIRE(T::pre_rope == X::pre_rope);
  REQUIRE(T::latent == X::latent);
  REQUIRE(std::is_same_v<typename T::exact_type, typename X::exact_type>);
  const index_t heads = 2, dim = 64;
  require_stream<typename T::KeyStream>(X::key_stream(heads, dim), heads, dim);
  require_stream<typename T::ValueStream>(X::value_stream(heads, dim), heads, dim);
  // Windows: the runtime rule advances exactly like the ALGORITHMS.md model over a long run of
  // decode steps and chunks (a compact check of sinks, window sizes, chunks and timing).
  for (int which = 0; which < 2; ++which) {
    kvq_test::StreamModel m = which == 0 ? X::key_model() : X::value_model();
    const kvq::WindowRule rule =
        which == 0 ? kvq::WindowRule::of<typename P::KeyWindow>() : kvq::WindowRule::of<typename P::ValueWindow>();
    REQUIRE(rule.sinks == m.sink_cap);
    kvq::StreamCounts c{};
    for (index_t n : {index_t{3}, index_t{1}, index_t{1}, index_t{200}, index_t{1}, index_t{0}, index_t{1}, index_t{77}}) {
      for (int rep = 0; rep < 150; ++rep) {
        c = rule.after_append(c, n);
        m.append(n);
        if (c.quantized != m.quantized) {
          CAPTURE(which, n, rep, c.length, c.quantized, m.length, m.quantized);
          REQUIRE(c.quantized == m.quantized);
        }
      }
    }
  }
  // Blocks never cut a per-channel group (DESIGN.md §3: T is a multiple of every group along
  // tokens).
  for (const auto& s : {X::key_stream(heads, dim), X::value_stream(heads, dim)}) {
    if (s.quantized && s.spec.axis == GroupAxis::kTokens) REQUIRE(P::block_tokens % s.spec.group_size == 0);
  }
}

}  // namespace

TEST_CASE("every policy type stores what ALGORITHMS.md describes", "[policy]") {
  require_policy_matches_algorithms<Fp16>();
  require_policy_matches_algorithms<Bf16>();
  require_policy_matches_algorithms<Fp32>();
  require_policy_matches_algorithms<KiviK2>();
  require_policy_matches_algorithms<KiviK4>();
  require_policy_matches_algorithms<SkvqK2V15>();
  require_policy_matches_algorithms<SkvqK2V2>();
  require_policy_matches_algorithms<CskvK4V4>();
  require_policy_matches_algorithms<CskvK2V4>();
  require_policy_matches_algorithms<PerTokenK2>();
  require_policy_matches_algorithms<PerTokenK4>();
  require_policy_matches_algorithms<KiviSmall34>();
  require_policy_matches_algorithms<SkvqVariant>();
  require_policy_matches_algorithms<CskvSmall>();
  require_policy_matches_algorithms<CskvFp16Small>();
  require_policy_matches_algorithms<SkvqK2V15G32>();
  require_policy_matches_algorithms<CskvK4V4R10>();
  require_policy_matches_algorithms<CskvFp16R25>();
}

TEST_CASE("published defaults are the policies' defaults", "[policy]") {
  // KIVI: G = 32, R = 128 (§1.7).
  STATIC_REQUIRE(kvq::KiviPolicy<Bits::k2, Bits::k2>::group_size == 32);
  STATIC_REQUIRE(kvq::KiviPolicy<Bits::k2, Bits::k2>::residual_tokens == 128);
  // SKVQ LongBench setting (§2.7): G = 128, W = 128, S = 5, clip 0.92, fp8 metadata, pre-RoPE.
  using S = kvq::SkvqPolicy<Bits::k2, Bits::kTernary>;
  STATIC_REQUIRE(S::group_size == 128);
  STATIC_REQUIRE(S::window_tokens == 128);
  STATIC_REQUIRE(S::sink_tokens == 5);
  STATIC_REQUIRE(S::pre_rope);
  STATIC_REQUIRE(S::KeyStream::meta == MetaFormat::kFp8E4M3);
  STATIC_REQUIRE(S::ValueStream::bits == Bits::kTernary);
  REQUIRE(S::KeyStream::clip == 0.92f);
  // CSKV: window 32 (§3.2), keys pre-RoPE.
  STATIC_REQUIRE(kvq::CskvPolicy<Bits::k4, Bits::k4>::window_tokens == 32);
  STATIC_REQUIRE(kvq::CskvPolicy<Bits::k4, Bits::k4>::pre_rope);
  // Baselines: fp16 by default; per-token groups of 32 with no window.
  STATIC_REQUIRE(std::is_same_v<kvq::Fp16Policy<>::exact_type, kvq::Float16>);
  STATIC_REQUIRE(kvq::PerTokenPolicy<Bits::k2, Bits::k2>::KeyWindow::max_window == 0);
}

TEST_CASE("policy names", "[policy]") {
  REQUIRE(SkvqVariant::name() == "skvq-k8v3-g16-w5-s0-c960-bf16-postrope");
  REQUIRE(kvq::SkvqPolicy<Bits::k4, Bits::k4, 64, 0, 5, 960>::name() == "skvq-k4v4-g64-w0-s5-c960");
  REQUIRE(kvq::SkvqPolicy<Bits::k2, Bits::k2, 32, 16, 2, 920, MetaFormat::kFp16>::name() == "skvq-k2v2-g32-w16-s2-fp16");
  REQUIRE(KiviSmall34::name() == "kivi-k3v4-g4-r12");
  REQUIRE(CskvSmall::name() == "cskv-k4v2-r50-75-w4");
  REQUIRE(CskvFp16Small::name() == "cskv-fp16-r50-25-w4");
  REQUIRE(kvq::PerTokenPolicy<Bits::k8, Bits::kTernary, 16>::name() == "pertoken-k8v1.5-g16");
}

TEST_CASE("the registry lists, finds and rejects policies by name", "[policy][registry]") {
  const std::vector<std::string> want = {"fp16",
                                         "bf16",
                                         "fp32",
                                         "kivi-k2v2-g32-r128",
                                         "kivi-k4v4-g32-r128",
                                         "skvq-k2v1.5-g128-w128-s5",
                                         "skvq-k2v2-g128-w128-s5",
                                         "skvq-k2v1.5-g32-w128-s5",
                                         "skvq-k2v2-g32-w128-s5",
                                         "skvq-k2v1.5-g8-w128-s5",
                                         "skvq-k2v2-g8-w128-s5",
                                         "cskv-k4v4-r50-50-w32",
                                         "cskv-k2v4-r25-75-w32",
                                         "cskv-k4v4-r25-75-w32",
                                         "cskv-k4v4-r10-30-w32",
                                         "cskv-fp16-r25-75-w32",
                                         "cskv-fp16-r10-30-w32",
                                         "pertoken-k2v2-g32",
                                         "pertoken-k4v4-g32"};
  REQUIRE(kvq::policy_names() == want);
  REQUIRE(std::set<std::string>(want.begin(), want.end()).size() == want.size());
  for (const std::string& name : want) {
    int calls = 0;
    std::string got;
    kvq::dispatch_policy(name, [&](auto tag) {
      ++calls;
      got = decltype(tag)::type::name();
    });
    REQUIRE(calls == 1);
    REQUIRE(got == name);
  }
  for (const std::string bad : {"", "kivi", "KIVI-k2v2-g32-r128", "fp16 ", "skvq-k2v1.5-g128-w128-s4"}) {
    CAPTURE(bad);
    bool threw = false;
    try {
      kvq::dispatch_policy(bad, [](auto) { FAIL("dispatched an unknown name"); });
    } catch (const kvq::Error& e) {
      threw = true;
      const std::string what = e.what();
      CAPTURE(what);
      REQUIRE(e.status() == kvq::Status::kInvalidArgument);
      REQUIRE(what.find("argument 'policy'") != std::string::npos);
      REQUIRE(what.find("kivi-k2v2-g32-r128") != std::string::npos);  // lists the known names
      REQUIRE(what.find("pertoken-k4v4-g32") != std::string::npos);
    }
    REQUIRE(threw);
  }
}

TEST_CASE("every registered policy builds a cache that appends and attends", "[policy][registry]") {
  const std::uint64_t seed = kvq_test::case_seed("registry smoke", 0);
  CAPTURE(seed);
  kvq::Rng rng(seed);
  kvq::for_each_policy([&](auto tag) {
    using P = typename decltype(tag)::type;
    CAPTURE(P::name());
    auto cache = kvq_test::make_cache<P>(2, 2, 64, 64);
    const auto seq = cache.add_sequence();
    const auto bias = kvq_test::make_bias(rng, 128);
    const auto x = kvq_test::make_rows(rng, 300, bias);
    for (index_t l = 0; l < 2; ++l) cache.append(seq, l, x.data(), x.data(), 300);
    std::vector<float> q(4 * 64), out(q.size()), ref(q.size());
    for (float& v : q) v = rng.normal();
    kvq::attend(cache, seq, 1, kvq::StridedView<const float, 2>(q.data(), {4, 64}), kvq::StridedView<float, 2>(out.data(), {4, 64}));
    kvq::ref::attend(cache, seq, 1, kvq::StridedView<const float, 2>(q.data(), {4, 64}), kvq::StridedView<float, 2>(ref.data(), {4, 64}));
    REQUIRE(kvq_test::relative_error(out, ref) <= 1e-5);
    REQUIRE(cache.bits_per_element() > 0.0);
  });
}
