// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief The compiled-in policies by name: for CLIs and experiments that choose a policy at run
///        time (engines pick the type directly).
#pragma once

#include <string>
#include <type_traits>
#include <vector>

#include "kvq/core/error.hpp"
#include "kvq/policy/baselines.hpp"
#include "kvq/policy/cskv.hpp"
#include "kvq/policy/kivi.hpp"
#include "kvq/policy/skvq.hpp"

namespace kvq {

/// A policy type as a value: f(PolicyTag<P>{}) receives one.
template <class P>
struct PolicyTag {
  using type = P;
};

template <class... P>
struct PolicyList {};

/// The registry, in the order `kvq policies` lists it. Names come from each policy's name().
/// SKVQ at g8 is for models with small rows (stories260K: 4 kv heads x 8 channels = 32, one g32
/// group, where channel reordering has nothing to choose).
using RegisteredPolicies =
    PolicyList<Fp16Policy<Float16>, Fp16Policy<BFloat16>, Fp16Policy<float>,
               KiviPolicy<Bits::k2, Bits::k2, 32, 128>, KiviPolicy<Bits::k4, Bits::k4, 32, 128>,
               SkvqPolicy<Bits::k2, Bits::kTernary, 128, 128, 5>,
               SkvqPolicy<Bits::k2, Bits::k2, 128, 128, 5>,
               SkvqPolicy<Bits::k2, Bits::kTernary, 32, 128, 5>,
               SkvqPolicy<Bits::k2, Bits::k2, 32, 128, 5>,
               SkvqPolicy<Bits::k2, Bits::kTernary, 8, 128, 5>,
               SkvqPolicy<Bits::k2, Bits::k2, 8, 128, 5>,
               CskvPolicy<Bits::k4, Bits::k4, 50, 50, 32>, CskvPolicy<Bits::k2, Bits::k4, 25, 75, 32>,
               CskvPolicy<Bits::k4, Bits::k4, 25, 75, 32>, CskvPolicy<Bits::k4, Bits::k4, 10, 30, 32>,
               CskvFp16Policy<25, 75, 32>, CskvFp16Policy<10, 30, 32>,
               PerTokenPolicy<Bits::k2, Bits::k2, 32>, PerTokenPolicy<Bits::k4, Bits::k4, 32>>;

namespace detail {

template <class F, class... P>
void for_each_in(PolicyList<P...>, F&& f) {
  (f(PolicyTag<P>{}), ...);
}

}  // namespace detail

/// The policies `kvq eval` compares by default: the fp16 cache (the reference), KIVI at 4 and 2
/// bits, SKVQ with 2-bit keys and ternary or 2-bit values in groups of 32 channels (a SmolLM2 row
/// of 192 channels has only 2 groups of 128: docs/results.md), CSKV at half the channels
/// (25% of the key and 75% of the value channels, 4-bit latents), and the per-token baselines at
/// 2 and 4 bits. SKVQ and CSKV are calibrated by kvq eval unless told otherwise.
inline std::vector<std::string> main_policy_names() {
  return {"fp16",
          "kivi-k4v4-g32-r128",
          "kivi-k2v2-g32-r128",
          "skvq-k2v1.5-g32-w128-s5",
          "skvq-k2v2-g32-w128-s5",
          "cskv-k4v4-r25-75-w32",
          "pertoken-k2v2-g32",
          "pertoken-k4v4-g32"};
}

/// Calls f(PolicyTag<P>{}) for every registered policy, in registry order.
template <class F>
void for_each_policy(F&& f) {
  detail::for_each_in(RegisteredPolicies{}, f);
}

/// Names of the registered policies, in registry order.
inline std::vector<std::string> policy_names() {
  std::vector<std::string> names;
  for_each_policy([&](auto tag) { names.push_back(decltype(tag)::type::name()); });
  return names;
}

/// Calls f(PolicyTag<P>{}) for the registered policy called `name`; throws kvq::Error naming the
/// known policies otherwise.
template <class F>
void dispatch_policy(const std::string& name, F&& f) {
  bool found = false;
  for_each_policy([&](auto tag) {
    if (!found && decltype(tag)::type::name() == name) {
      found = true;
      f(tag);
    }
  });
  if (!found) {
    std::string known;
    for (const std::string& n : policy_names()) known += (known.empty() ? "" : ", ") + n;
    detail::throw_argument_error("kvq::dispatch_policy", "policy", name, "one of " + known);
  }
}

}  // namespace kvq
