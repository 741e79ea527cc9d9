// SPDX-License-Identifier: Apache-2.0
// GGUF files: metadata of every value type, hand-encoded F32/F16/BF16/Q4_0/Q4_1/Q8_0 blocks,
// a synthetic two-layer llama model loaded weight for weight, the RoPE row un-permutation, and
// clear kvq::Errors on every truncation and on corrupted fields.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "kvq/core/error.hpp"
#include "kvq_catch.hpp"
#include "require_error.hpp"
#include "llm/bpe_tokenizer.hpp"
#include "llm/gguf.hpp"
#include "llm/gguf_model.hpp"

namespace {

using kvq::llm::GgufFile;
using kvq::llm::GgufValueType;

// ---- a GGUF writer: little-endian fields exactly as the format lays them out ----

std::string le(std::uint64_t v, int bytes) {
  std::string s;
  for (int i = 0; i < bytes; ++i) s.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
  return s;
}
std::string u32(std::uint32_t v) { return le(v, 4); }
std::string u64(std::uint64_t v) { return le(v, 8); }
std::string gstr(const std::string& s) { return u64(s.size()) + s; }
std::string f32_bits(float f) {
  std::uint32_t b;
  std::memcpy(&b, &f, 4);
  return u32(b);
}
std::string type_tag(GgufValueType t) { return u32(static_cast<std::uint32_t>(t)); }

// Encoded values: the u32 value type followed by the value.
std::string v_u32(std::uint32_t v) { return type_tag(GgufValueType::kUint32) + u32(v); }
std::string v_f32(float v) { return type_tag(GgufValueType::kFloat32) + f32_bits(v); }
std::string v_bool(bool v) {
  return type_tag(GgufValueType::kBool) + std::string(1, v ? '\1' : '\0');
}
std::string v_str(const std::string& s) { return type_tag(GgufValueType::kString) + gstr(s); }
std::string v_str_array(const std::vector<std::string>& items) {
  std::string s =
      type_tag(GgufValueType::kArray) + type_tag(GgufValueType::kString) + u64(items.size());
  for (const std::string& item : items) s += gstr(item);
  return s;
}
std::string v_i32_array(const std::vector<std::int32_t>& items) {
  std::string s =
      type_tag(GgufValueType::kArray) + type_tag(GgufValueType::kInt32) + u64(items.size());
  for (std::int32_t item : items) s += u32(static_cast<std::uint32_t>(item));
  return s;
}

struct TensorSpec {
  std::string name;
  std::vector<std::uint64_t> dims;
  std::uint32_t type = 0;
  std::string data;
  std::uint64_t offset_override = ~std::uint64_t{0};  // all ones: computed
};

/// A GGUF file under construction. build() pads every tensor's data to the alignment except the
/// last one, so the file ends exactly where the last tensor does (every shorter prefix is
/// truncated inside some field or tensor).
struct GgufBuilder {
  std::uint32_t version = 3;
  std::uint32_t alignment = 32;  // padding used; write "general.alignment" yourself to change it
  std::vector<std::pair<std::string, std::string>> kvs;
  std::vector<TensorSpec> tensors;

  void set(const std::string& key, std::string value) {
    for (auto& kv : kvs) {
      if (kv.first == key) {
        kv.second = std::move(value);
        return;
      }
    }
    kvs.emplace_back(key, std::move(value));
  }
  void erase_key(const std::string& key) {
    for (std::size_t i = 0; i < kvs.size(); ++i) {
      if (kvs[i].first == key) {
        kvs.erase(kvs.begin() + static_cast<std::ptrdiff_t>(i));
        return;
      }
    }
    FAIL("no key " << key);
  }
  TensorSpec& tensor(const std::string& name) {
    for (TensorSpec& t : tensors) {
      if (t.name == name) return t;
    }
    FAIL("no tensor " << name);
    return tensors.front();
  }
  void erase_tensor(const std::string& name) {
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      if (tensors[i].name == name) {
        tensors.erase(tensors.begin() + static_cast<std::ptrdiff_t>(i));
        return;
      }
    }
    FAIL("no tensor " << name);
  }

  std::string build() const {
    std::string out = "GGUF" + u32(version) + u64(tensors.size()) + u64(kvs.size());
    for (const auto& [key, value] : kvs) out += gstr(key) + value;
    std::uint64_t offset = 0;
    std::vector<std::uint64_t> offsets;
    for (const TensorSpec& t : tensors) {
      offsets.push_back(offset);
      offset += (t.data.size() + alignment - 1) / alignment * alignment;
    }
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      const TensorSpec& t = tensors[i];
      out += gstr(t.name) + u32(static_cast<std::uint32_t>(t.dims.size()));
      for (std::uint64_t d : t.dims) out += u64(d);
      out += u32(t.type) +
             u64(t.offset_override != ~std::uint64_t{0} ? t.offset_override : offsets[i]);
    }
    out.append((alignment - out.size() % alignment) % alignment, '\0');
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      out += tensors[i].data;
      if (i + 1 < tensors.size())
        out.append((alignment - tensors[i].data.size() % alignment) % alignment, '\0');
    }
    return out;
  }
};

std::vector<std::uint8_t> to_bytes(const std::string& s) {
  return std::vector<std::uint8_t>(s.begin(), s.end());
}

GgufFile parse(const std::string& bytes) {
  return GgufFile::parse(to_bytes(bytes), "synthetic.gguf");
}

kvq::llm::LoadedGguf load(const std::string& bytes, kvq::llm::GgufLoadOptions options = {}) {
  return kvq::llm::load_gguf_model(parse(bytes), options);
}


// ---- block encoders: (scale, codes) -> bytes, with the expected floats computed from the same
// scale and codes (never by decoding the bytes) ----

/// IEEE half bit patterns of the scales the tests use (exact in fp16).
std::uint16_t half_bits(float x) {
  if (x == 0.25f) return 0x3400;
  if (x == 0.5f) return 0x3800;
  if (x == 1.0f) return 0x3C00;
  if (x == 2.0f) return 0x4000;
  if (x == -1.0f) return 0xBC00;
  if (x == -0.5f) return 0xB800;
  if (x == 0.0f) return 0x0000;
  if (x == 0.125f) return 0x3000;
  FAIL("no fp16 pattern for " << x);
  return 0;
}

struct Encoded {
  std::string bytes;
  std::vector<float> values;
};

/// Q8_0 rows: per block fp16 d, then 32 int8 codes; x = q * d.
Encoded q8_0(std::size_t elements, int seed) {
  Encoded e;
  for (std::size_t b = 0; b < elements / 32; ++b) {
    const float d = b % 2 ? 0.25f : 0.5f;
    e.bytes += le(half_bits(d), 2);
    for (int j = 0; j < 32; ++j) {
      const int q =
          static_cast<int>(
              (static_cast<std::size_t>(j) * 7 + b * 3 + static_cast<std::size_t>(seed)) % 255) -
          127;
      e.bytes.push_back(static_cast<char>(static_cast<std::int8_t>(q)));
      e.values.push_back(static_cast<float>(q) * d);
    }
  }
  return e;
}

/// Q4_1: fp16 d, fp16 m, 16 bytes; element j < 16 is the low nibble of byte j, element 16 + j
/// its high nibble; x = q * d + m.
Encoded q4_1(std::size_t elements, int seed) {
  Encoded e;
  for (std::size_t b = 0; b < elements / 32; ++b) {
    const float d = 0.25f;
    const float m = b % 3 == 0 ? -1.0f : b % 3 == 1 ? -0.5f : 0.0f;
    e.bytes += le(half_bits(d), 2) + le(half_bits(m), 2);
    std::vector<float> block(32);
    for (int j = 0; j < 16; ++j) {
      const auto lo = static_cast<unsigned>(
          (static_cast<std::size_t>(j) + b + static_cast<std::size_t>(seed)) % 16);
      const auto hi = static_cast<unsigned>(
          (static_cast<std::size_t>(j) * 3 + b + static_cast<std::size_t>(seed)) % 16);
      e.bytes.push_back(static_cast<char>(lo | (hi << 4)));
      block[static_cast<std::size_t>(j)] = static_cast<float>(lo) * d + m;
      block[static_cast<std::size_t>(j) + 16] = static_cast<float>(hi) * d + m;
    }
    e.values.insert(e.values.end(), block.begin(), block.end());
  }
  return e;
}

/// Q4_0: fp16 d, 16 bytes, same nibble order; x = (q - 8) * d.
Encoded q4_0(std::size_t elements, int seed) {
  Encoded e;
  for (std::size_t b = 0; b < elements / 32; ++b) {
    const float d = b % 2 ? 2.0f : 0.125f;
    e.bytes += le(half_bits(d), 2);
    std::vector<float> block(32);
    for (int j = 0; j < 16; ++j) {
      const auto lo = static_cast<unsigned>(
          (static_cast<std::size_t>(j) * 5 + b + static_cast<std::size_t>(seed)) % 16);
      const auto hi = static_cast<unsigned>(
          (static_cast<std::size_t>(j) + 2 * b + static_cast<std::size_t>(seed)) % 16);
      e.bytes.push_back(static_cast<char>(lo | (hi << 4)));
      block[static_cast<std::size_t>(j)] = (static_cast<float>(lo) - 8.0f) * d;
      block[static_cast<std::size_t>(j) + 16] = (static_cast<float>(hi) - 8.0f) * d;
    }
    e.values.insert(e.values.end(), block.begin(), block.end());
  }
  return e;
}

Encoded f32(std::size_t elements, int seed) {
  Encoded e;
  for (std::size_t i = 0; i < elements; ++i) {
    const float x =
        static_cast<float>((i * 13 + static_cast<std::size_t>(seed)) % 17) * 0.125f - 1.0f;
    e.bytes += f32_bits(x);
    e.values.push_back(x);
  }
  return e;
}

/// fp16 patterns and their values (normal, negative, subnormal, largest finite).
const std::vector<std::pair<std::uint16_t, float>>& f16_table() {
  static const std::vector<std::pair<std::uint16_t, float>> t{{0x3C00, 1.0f},
                                                              {0xC000, -2.0f},
                                                              {0x3555, 0.333251953125f},
                                                              {0x0001, 5.9604644775390625e-8f},
                                                              {0x7BFF, 65504.0f},
                                                              {0x8000, -0.0f},
                                                              {0x4248, 3.140625f},
                                                              {0xB400, -0.25f}};
  return t;
}

Encoded f16(std::size_t elements, int seed) {
  Encoded e;
  for (std::size_t i = 0; i < elements; ++i) {
    const auto& [bits, value] =
        f16_table()[(i + static_cast<std::size_t>(seed)) % f16_table().size()];
    e.bytes += le(bits, 2);
    e.values.push_back(value);
  }
  return e;
}

/// bf16 patterns: the top 16 bits of a float.
Encoded bf16(std::size_t elements, int seed) {
  static const std::vector<std::pair<std::uint16_t, float>> t{
      {0x3F80, 1.0f}, {0xC040, -3.0f}, {0x3FC0, 1.5f}, {0x4049, 3.140625f}, {0xBE80, -0.25f}};
  Encoded e;
  for (std::size_t i = 0; i < elements; ++i) {
    const auto& [bits, value] = t[(i * 3 + static_cast<std::size_t>(seed)) % t.size()];
    e.bytes += le(bits, 2);
    e.values.push_back(value);
  }
  return e;
}

// ---- a synthetic llama model: dim 32, 2 heads of 16, 1 KV head, hidden 64, 2 layers, the
// 256 byte symbols + <|endoftext|> + 3 merges as vocabulary (260 tokens) ----

constexpr int kDim = 32, kHidden = 64, kHeads = 2, kKvHeads = 1, kHeadDim = 16, kLayers = 2;
constexpr int kKvDim = kKvHeads * kHeadDim;

std::vector<std::string> synthetic_tokens() {
  std::vector<std::string> tokens{"<|endoftext|>"};
  for (int b = 0; b < 256; ++b) {
    std::string s;
    const auto cp =
        static_cast<std::uint32_t>(kvq::llm::byte_to_unicode(static_cast<std::uint8_t>(b)));
    if (cp < 0x80) {
      s.push_back(static_cast<char>(cp));
    } else {
      s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
      s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
    tokens.push_back(s);
  }
  for (const char* t : {"he", "Ġt", "Ġthe"}) tokens.emplace_back(t);
  return tokens;
}
constexpr int kVocab = 260;

struct SyntheticModel {
  GgufBuilder builder;
  std::vector<std::pair<std::string, std::vector<float>>>
      expected;  // tensor name -> floats (file order)

  const std::vector<float>& values(const std::string& name) const {
    for (const auto& [n, v] : expected) {
      if (n == name) return v;
    }
    FAIL("no tensor " << name);
    return expected.front().second;
  }
};

/// `compact`: hidden 32 and a 4-token vocabulary without merges, a third of the bytes (for the
/// every-truncation test).
SyntheticModel synthetic_model(bool tied = true, bool compact = false) {
  const int hidden = compact ? 32 : kHidden;
  const std::vector<std::string> tokens =
      compact ? std::vector<std::string>{"<|endoftext|>", "a", "b", "Ġ"} : synthetic_tokens();
  SyntheticModel s;
  GgufBuilder& b = s.builder;
  b.set("general.architecture", v_str("llama"));
  b.set("general.name", v_str("Tiny Llama"));
  b.set("llama.block_count", v_u32(kLayers));
  b.set("llama.context_length", v_u32(128));
  b.set("llama.embedding_length", v_u32(kDim));
  b.set("llama.feed_forward_length", v_u32(static_cast<std::uint32_t>(hidden)));
  b.set("llama.attention.head_count", v_u32(kHeads));
  b.set("llama.attention.head_count_kv", v_u32(kKvHeads));
  b.set("llama.rope.freq_base", v_f32(50000.0f));
  b.set("llama.attention.layer_norm_rms_epsilon", v_f32(1e-5f));
  b.set("llama.rope.dimension_count", v_u32(kHeadDim));
  b.set("tokenizer.ggml.model", v_str("gpt2"));
  b.set("tokenizer.ggml.pre", v_str("smollm"));
  b.set("tokenizer.ggml.tokens", v_str_array(tokens));
  std::vector<std::int32_t> types(tokens.size(), 1);
  types[0] = 3;
  b.set("tokenizer.ggml.token_type", v_i32_array(types));
  b.set("tokenizer.ggml.merges",
        v_str_array(compact ? std::vector<std::string>{}
                            : std::vector<std::string>{"h e", "Ġ t", "Ġt he"}));
  b.set("tokenizer.ggml.bos_token_id", v_u32(0));
  b.set("tokenizer.ggml.eos_token_id", v_u32(0));
  b.set("tokenizer.ggml.add_bos_token", v_bool(false));

  int seed = 0;
  const auto add = [&](const std::string& name, std::vector<std::uint64_t> dims,
                       kvq::llm::GgmlType type) {
    std::size_t n = 1;
    for (std::uint64_t d : dims) n *= static_cast<std::size_t>(d);
    Encoded e;
    switch (type) {
      case kvq::llm::GgmlType::kQ8_0:
        e = q8_0(n, seed);
        break;
      case kvq::llm::GgmlType::kQ4_1:
        e = q4_1(n, seed);
        break;
      case kvq::llm::GgmlType::kQ4_0:
        e = q4_0(n, seed);
        break;
      case kvq::llm::GgmlType::kF16:
        e = f16(n, seed);
        break;
      case kvq::llm::GgmlType::kBF16:
        e = bf16(n, seed);
        break;
      default:
        e = f32(n, seed);
        break;
    }
    ++seed;
    b.tensors.push_back(
        {name, std::move(dims), static_cast<std::uint32_t>(type), std::move(e.bytes)});
    s.expected.emplace_back(name, std::move(e.values));
  };
  using T = kvq::llm::GgmlType;
  const auto d = static_cast<std::uint64_t>(kDim), h = static_cast<std::uint64_t>(hidden),
             kv = static_cast<std::uint64_t>(kKvDim), v = static_cast<std::uint64_t>(tokens.size());
  add("token_embd.weight", {d, v}, T::kQ8_0);
  for (int l = 0; l < kLayers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    add(p + "attn_norm.weight", {d}, T::kF32);
    add(p + "attn_q.weight", {d, d}, T::kQ4_1);
    add(p + "attn_k.weight", {d, kv}, l == 0 ? T::kQ8_0 : T::kQ4_1);
    add(p + "attn_v.weight", {d, kv}, l == 0 ? T::kF16 : T::kQ8_0);
    add(p + "attn_output.weight", {d, d}, l == 0 ? T::kQ4_0 : T::kQ4_1);
    add(p + "ffn_norm.weight", {d}, T::kF32);
    add(p + "ffn_gate.weight", {d, h}, T::kQ4_1);
    add(p + "ffn_up.weight", {d, h}, l == 0 ? T::kF32 : T::kBF16);
    add(p + "ffn_down.weight", {h, d}, l == 0 ? T::kQ8_0 : T::kF16);
  }
  if (!tied) add("output.weight", {d, v}, T::kQ4_1);
  add("output_norm.weight", {d}, T::kF32);
  return s;
}

void require_matrix(const kvq::llm::Matrix& m, int rows, int cols,
                    const std::vector<float>& expected) {
  REQUIRE(m.rows == rows);
  REQUIRE(m.cols == cols);
  REQUIRE(m.data == expected);
}

/// The Hugging Face order of GGUF rows: HF row j*(d/2) + i of a head = GGUF row 2i + j.
std::vector<float> hf_rows(const std::vector<float>& gguf, int heads, int head_dim, int cols) {
  std::vector<float> out(gguf.size());
  for (int h = 0; h < heads; ++h) {
    for (int i = 0; i < head_dim / 2; ++i) {
      for (int j = 0; j < 2; ++j) {
        const auto src =
            static_cast<std::size_t>(h * head_dim + 2 * i + j) * static_cast<std::size_t>(cols);
        const auto dst = static_cast<std::size_t>(h * head_dim + j * (head_dim / 2) + i) *
                         static_cast<std::size_t>(cols);
        std::copy_n(gguf.begin() + static_cast<std::ptrdiff_t>(src), cols,
                    out.begin() + static_cast<std::ptrdiff_t>(dst));
      }
    }
  }
  return out;
}

std::size_t find_bytes(const std::string& file, const std::string& needle) {
  const std::size_t at = file.find(needle);
  REQUIRE(at != std::string::npos);
  return at;
}

void patch(std::string& file, std::size_t at, const std::string& bytes) {
  file.replace(at, bytes.size(), bytes);
}

}  // namespace

TEST_CASE("GgufFile reads metadata of every value type", "[llm][gguf]") {
  GgufBuilder b;
  b.version = 2;
  b.set("u8", type_tag(GgufValueType::kUint8) + std::string(1, '\xC8'));
  b.set("i8", type_tag(GgufValueType::kInt8) + std::string(1, '\xF6'));
  b.set("u16", type_tag(GgufValueType::kUint16) + le(65000, 2));
  b.set("i16", type_tag(GgufValueType::kInt16) + le(0xFFFE, 2));
  b.set("u32", v_u32(4000000000u));
  b.set("i32", type_tag(GgufValueType::kInt32) + u32(static_cast<std::uint32_t>(-7)));
  b.set("u64", type_tag(GgufValueType::kUint64) + u64(std::uint64_t{1} << 40));
  b.set("i64", type_tag(GgufValueType::kInt64) + u64(static_cast<std::uint64_t>(-5)));
  b.set("f32", v_f32(0.15625f));
  b.set("f64", type_tag(GgufValueType::kFloat64) + u64(0x400921FB54442D18ull));
  b.set("yes", v_bool(true));
  b.set("name", v_str("tiny"));
  b.set("strings", v_str_array({"a", "", "Ġb c"}));
  b.set("ints", type_tag(GgufValueType::kArray) + type_tag(GgufValueType::kInt16) + u64(3) +
                    le(1, 2) + le(0xFFFF, 2) + le(300, 2));
  b.set("nested", type_tag(GgufValueType::kArray) + type_tag(GgufValueType::kArray) + u64(2) +
                      type_tag(GgufValueType::kUint8) + u64(2) + "\x01\x02" +
                      type_tag(GgufValueType::kString) + u64(1) + gstr("x"));
  const GgufFile g = parse(b.build());

  REQUIRE(g.version() == 2);
  REQUIRE(g.alignment() == 32);
  REQUIRE(g.metadata().size() == 15);
  REQUIRE(g.get_u32("u8") == 200);
  REQUIRE(g.get_i32("i8") == -10);
  REQUIRE(g.get_u32("u16") == 65000);
  REQUIRE(g.get_i64("i16") == -2);
  REQUIRE(g.get_u32("u32") == 4000000000u);
  REQUIRE(g.get_u64("u32") == 4000000000u);
  REQUIRE(g.get_i32("i32") == -7);
  REQUIRE(g.get_u64("u64") == (std::uint64_t{1} << 40));
  REQUIRE(g.get_i64("i64") == -5);
  REQUIRE(g.get_f32("f32") == 0.15625f);
  REQUIRE(g.get_f32("f64") == static_cast<float>(3.141592653589793));
  REQUIRE(g.get_bool("yes"));
  REQUIRE(g.get_string("name") == "tiny");
  REQUIRE(g.get_string_array("strings") == std::vector<std::string>{"a", "", "Ġb c"});
  REQUIRE(g.get_i32_array("ints") == std::vector<std::int32_t>{1, -1, 300});
  const auto& nested = std::get<kvq::llm::GgufArray>(g.find("nested")->value.data);
  REQUIRE(nested.items.size() == 2);
  REQUIRE(std::get<kvq::llm::GgufArray>(nested.items[0].data).items.size() == 2);
  REQUIRE(std::get<std::string>(
              std::get<kvq::llm::GgufArray>(nested.items[1].data).items[0].data) == "x");
  REQUIRE(g.find("nested")->value.type_text() == "array of array of uint8");

  REQUIRE(g.find_u32("u8") == std::optional<std::uint32_t>(200));
  REQUIRE_FALSE(g.find_u32("absent").has_value());
  REQUIRE_FALSE(g.find_string("absent").has_value());
  REQUIRE(g.find_bool("yes") == std::optional<bool>(true));

  kvq_test::require_error([&] { (void)g.get_u32("i32"); }, {"synthetic.gguf", "'i32'", "int32 -7", "uint32"});
  kvq_test::require_error([&] { (void)g.get_i32("u32"); }, {"'u32'", "uint32 4000000000", "int32"});
  kvq_test::require_error([&] { (void)g.get_u32("u64"); }, {"'u64'", "1099511627776"});
  kvq_test::require_error([&] { (void)g.get_f32("name"); }, {"'name'", "string 'tiny'", "float32"});
  kvq_test::require_error([&] { (void)g.get_string("u8"); }, {"'u8'", "uint8 200", "expected a string"});
  kvq_test::require_error([&] { (void)g.get_string_array("ints"); },
                {"'ints'", "array of int16", "array of string"});
  kvq_test::require_error([&] { (void)g.find_u32("name"); }, {"'name'", "string"});
  kvq_test::require_error([&] { (void)g.get_u32("absent"); }, {"'absent'", "missing"});
  kvq_test::require_error([&] { (void)g.tensor("absent.weight"); }, {"'absent.weight'", "missing"});
}

TEST_CASE("GgufFile dequantizes hand-encoded blocks", "[llm][gguf]") {
  // One block per quantized type, bytes written out by hand.
  std::string q4_0_block = le(0x4000, 2);                  // d = 2
  std::string q4_1_block = le(0x3400, 2) + le(0xBC00, 2);  // d = 0.25, m = -1
  std::string q8_0_block = le(0x3800, 2);                  // d = 0.5
  for (int j = 0; j < 16; ++j) {
    q4_0_block.push_back(static_cast<char>(j == 0 ? 0x1F : 0x88));  // byte 0: low 15, high 1
    q4_1_block.push_back(static_cast<char>(j == 0 ? 0x2A : j == 15 ? 0xF0 : 0x44));
  }
  for (int j = 0; j < 32; ++j) {
    const int q = j == 0 ? -128 : j == 1 ? -1 : j == 2 ? 127 : j == 31 ? 1 : 0;
    q8_0_block.push_back(static_cast<char>(static_cast<std::int8_t>(q)));
  }
  GgufBuilder b;
  b.tensors.push_back({"q4_0", {32}, 2, q4_0_block});
  b.tensors.push_back({"q4_1", {32}, 3, q4_1_block});
  b.tensors.push_back({"q8_0", {32}, 8, q8_0_block});
  b.tensors.push_back(
      {"f16", {4}, 1, le(0x3C00, 2) + le(0xC000, 2) + le(0x0001, 2) + le(0x7BFF, 2)});
  b.tensors.push_back({"bf16", {2}, 30, le(0x3F80, 2) + le(0xC040, 2)});
  b.tensors.push_back({"f32", {2, 1}, 0, f32_bits(-1.5f) + f32_bits(1e-30f)});
  const GgufFile g = parse(b.build());
  REQUIRE(g.tensors().size() == 6);
  REQUIRE(g.data_offset() % 32 == 0);

  const std::vector<float> a = g.dequantize(g.tensor("q4_0"));
  REQUIRE(a.size() == 32);
  REQUIRE(a[0] == 14.0f);    // (15 - 8) * 2
  REQUIRE(a[16] == -14.0f);  // (1 - 8) * 2
  REQUIRE(a[1] == 0.0f);
  REQUIRE(a[17] == 0.0f);

  const std::vector<float> q41 = g.dequantize(g.tensor("q4_1"));
  REQUIRE(q41[0] == 1.5f);    // 10 * 0.25 - 1
  REQUIRE(q41[16] == -0.5f);  // 2 * 0.25 - 1
  REQUIRE(q41[15] == -1.0f);  // 0 * 0.25 - 1
  REQUIRE(q41[31] == 2.75f);  // 15 * 0.25 - 1
  REQUIRE(q41[7] == 0.0f);    // 4 * 0.25 - 1
  REQUIRE(q41[23] == 0.0f);

  const std::vector<float> q8 = g.dequantize(g.tensor("q8_0"));
  REQUIRE(q8[0] == -64.0f);
  REQUIRE(q8[1] == -0.5f);
  REQUIRE(q8[2] == 63.5f);
  REQUIRE(q8[31] == 0.5f);
  REQUIRE(q8[3] == 0.0f);

  REQUIRE(g.dequantize(g.tensor("f16")) ==
          std::vector<float>{1.0f, -2.0f, 5.9604644775390625e-8f, 65504.0f});
  REQUIRE(g.dequantize(g.tensor("bf16")) == std::vector<float>{1.0f, -3.0f});
  REQUIRE(g.dequantize(g.tensor("f32")) == std::vector<float>{-1.5f, 1e-30f});
  REQUIRE(g.tensor("f32").dims_text() == "[2, 1]");

  std::vector<float> out(31);
  kvq_test::require_error([&] { g.dequantize_into(g.tensor("q8_0"), out.data(), out.size()); },
                {"'count' = 31", "32"});
}

TEST_CASE("load_gguf_model returns exactly the encoded weights", "[llm][gguf]") {
  for (const bool tied : {true, false}) {
    CAPTURE(tied);
    const SyntheticModel s = synthetic_model(tied);
    const auto loaded = load(s.builder.build(), {false});
    const kvq::llm::Model& m = loaded.model;
    const kvq::llm::ModelConfig& c = m.config;
    REQUIRE(c.num_layers == kLayers);
    REQUIRE(c.dim == kDim);
    REQUIRE(c.hidden_dim == kHidden);
    REQUIRE(c.num_heads == kHeads);
    REQUIRE(c.num_kv_heads == kKvHeads);
    REQUIRE(c.head_dim == kHeadDim);
    REQUIRE(c.vocab_size == kVocab);
    REQUIRE(c.max_context == 128);
    REQUIRE(c.norm_eps == 1e-5f);
    REQUIRE(c.rope.theta == 50000.0);
    REQUIRE(c.rope.style == kvq::RopeStyle::kAdjacentPairs);
    REQUIRE(m.format == "gguf");
    REQUIRE(m.name == "Tiny Llama");

    require_matrix(m.token_embedding, kVocab, kDim, s.values("token_embd.weight"));
    REQUIRE(m.layers.size() == 2);
    for (int l = 0; l < kLayers; ++l) {
      CAPTURE(l);
      const std::string p = "blk." + std::to_string(l) + ".";
      const kvq::llm::LayerWeights& w = m.layers[static_cast<std::size_t>(l)];
      REQUIRE(w.attn_norm == s.values(p + "attn_norm.weight"));
      require_matrix(w.wq, kDim, kDim, s.values(p + "attn_q.weight"));
      require_matrix(w.wk, kKvDim, kDim, s.values(p + "attn_k.weight"));
      require_matrix(w.wv, kKvDim, kDim, s.values(p + "attn_v.weight"));
      require_matrix(w.wo, kDim, kDim, s.values(p + "attn_output.weight"));
      REQUIRE(w.ffn_norm == s.values(p + "ffn_norm.weight"));
      require_matrix(w.w_gate, kHidden, kDim, s.values(p + "ffn_gate.weight"));
      require_matrix(w.w_up, kHidden, kDim, s.values(p + "ffn_up.weight"));
      require_matrix(w.w_down, kDim, kHidden, s.values(p + "ffn_down.weight"));
    }
    REQUIRE(m.final_norm == s.values("output_norm.weight"));
    if (tied) {
      REQUIRE(m.output.data.empty());
      REQUIRE(&m.classifier() == &m.token_embedding);
    } else {
      require_matrix(m.output, kVocab, kDim, s.values("output.weight"));
    }

    const auto& tok = *loaded.tokenizer;
    REQUIRE(tok.vocab_size() == kVocab);
    REQUIRE(tok.bos() == 0);
    REQUIRE(tok.eos() == 0);
    REQUIRE_FALSE(tok.add_bos());
    REQUIRE(tok.encode("the the") == std::vector<int>{117, 257, 259});  // t he, Ġt he -> Ġthe
    REQUIRE(tok.decode(-1, 0).empty());
  }

  // A few elements spelled out: Q8_0 token_embd row 1 = block 1 (d = 0.25), codes
  // (7j + 3) % 255 - 127; Q4_1 blk.0.attn_q.weight (seed 2) block 0 (d = 0.25, m = -1):
  // low nibble of byte j = (j + 2) % 16, high = (3j + 2) % 16.
  const auto loaded = load(synthetic_model().builder.build(), {false});
  const kvq::llm::Model& m = loaded.model;
  REQUIRE(m.token_embedding.row(1)[0] == -31.0f);   // (3 - 127) * 0.25
  REQUIRE(m.token_embedding.row(1)[1] == -29.25f);  // (10 - 127) * 0.25
  REQUIRE(m.token_embedding.row(0)[0] == -63.5f);   // (0 - 127) * 0.5
  REQUIRE(m.layers[0].wq.row(0)[0] == -0.5f);       // 2 * 0.25 - 1
  REQUIRE(m.layers[0].wq.row(0)[16] == -0.5f);      // 2 * 0.25 - 1
  REQUIRE(m.layers[0].wq.row(0)[1] == -0.25f);      // 3 * 0.25 - 1
  REQUIRE(m.layers[0].wq.row(0)[17] == 0.25f);      // 5 * 0.25 - 1
  REQUIRE(m.layers[0].wq.row(0)[14] == -1.0f);      // low nibble of byte 14: (14 + 2) % 16 = 0
  REQUIRE(m.layers[0].wq.row(0)[30] == 2.0f);  // high nibble of byte 14: (3 * 14 + 2) % 16 = 12
}

TEST_CASE("unpermute_qk restores the Hugging Face row order of wq and wk", "[llm][gguf]") {
  SyntheticModel s = synthetic_model();
  // F32 wq/wk whose every GGUF row r holds the value r, so each row's origin is visible.
  for (const char* name : {"blk.1.attn_q.weight", "blk.1.attn_k.weight"}) {
    TensorSpec& t = s.builder.tensor(name);
    const std::uint64_t rows = t.dims[1];
    t.type = 0;
    t.data.clear();
    std::vector<float> values;
    for (std::uint64_t r = 0; r < rows; ++r) {
      for (int c = 0; c < kDim; ++c) {
        t.data += f32_bits(static_cast<float>(r));
        values.push_back(static_cast<float>(r));
      }
    }
    for (auto& [n, v] : s.expected) {
      if (n == name) v = values;
    }
  }
  const std::string file = s.builder.build();
  const auto permuted = load(file, {false});
  const auto restored = load(file, {true});
  REQUIRE(restored.model.config.rope.style == kvq::RopeStyle::kHalfSplit);
  REQUIRE(permuted.model.config.rope.style == kvq::RopeStyle::kAdjacentPairs);

  const kvq::llm::Matrix& wq = restored.model.layers[1].wq;
  // Head 0 (rows 0..15): HF row j*8 + i = GGUF row 2i + j.
  REQUIRE(wq.row(0)[0] == 0.0f);
  REQUIRE(wq.row(1)[0] == 2.0f);
  REQUIRE(wq.row(7)[5] == 14.0f);
  REQUIRE(wq.row(8)[0] == 1.0f);
  REQUIRE(wq.row(9)[31] == 3.0f);
  REQUIRE(wq.row(15)[0] == 15.0f);
  // Head 1 (rows 16..31).
  REQUIRE(wq.row(16)[0] == 16.0f);
  REQUIRE(wq.row(17)[0] == 18.0f);
  REQUIRE(wq.row(24)[0] == 17.0f);
  REQUIRE(wq.row(31)[0] == 31.0f);
  const kvq::llm::Matrix& wk = restored.model.layers[1].wk;
  REQUIRE(wk.row(1)[0] == 2.0f);
  REQUIRE(wk.row(8)[0] == 1.0f);
  REQUIRE(wk.row(14)[0] == 13.0f);

  // Every wq/wk of both layers (quantized ones included) is the HF-ordered file matrix.
  for (int l = 0; l < kLayers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    REQUIRE(restored.model.layers[static_cast<std::size_t>(l)].wq.data ==
            hf_rows(s.values(p + "attn_q.weight"), kHeads, kHeadDim, kDim));
    REQUIRE(restored.model.layers[static_cast<std::size_t>(l)].wk.data ==
            hf_rows(s.values(p + "attn_k.weight"), kKvHeads, kHeadDim, kDim));
    REQUIRE(permuted.model.layers[static_cast<std::size_t>(l)].wq.data ==
            s.values(p + "attn_q.weight"));
    REQUIRE(restored.model.layers[static_cast<std::size_t>(l)].wv.data ==
            permuted.model.layers[static_cast<std::size_t>(l)].wv.data);
  }

  kvq::llm::Matrix bad{6, 2, std::vector<float>(12)};
  kvq_test::require_error([&] { kvq::llm::unpermute_rope_rows(bad, 2, 4); }, {"heads = 2", "head_dim = 4"});
}

TEST_CASE("every truncation of a valid GGUF file raises kvq::Error", "[llm][gguf]") {
  const std::string file = synthetic_model(false, true).builder.build();
  {
    const GgufFile g = parse(file);
    const kvq::llm::GgufTensorInfo& last = g.tensors().back();
    REQUIRE(g.data_offset() + last.offset + last.bytes == file.size());  // no trailing padding
    REQUIRE_NOTHROW(kvq::llm::load_gguf_model(g));
  }
  std::size_t not_rejected = 0, wrong_exception = 0, first_bad = file.size();
  for (std::size_t n = 0; n < file.size(); ++n) {
    try {
      (void)kvq::llm::load_gguf_model(GgufFile::parse(
          std::vector<std::uint8_t>(file.begin(), file.begin() + static_cast<std::ptrdiff_t>(n)),
          "cut.gguf"));
      ++not_rejected;
      first_bad = std::min(first_bad, n);
    } catch (const kvq::Error& e) {
      if (e.status() != kvq::Status::kFormatError ||
          std::string(e.what()).find("cut.gguf") == std::string::npos) {
        ++wrong_exception;
        first_bad = std::min(first_bad, n);
      }
    } catch (...) {
      ++wrong_exception;
      first_bad = std::min(first_bad, n);
    }
  }
  CAPTURE(file.size(), first_bad);
  REQUIRE(not_rejected == 0);
  REQUIRE(wrong_exception == 0);

  kvq_test::require_error([&] { (void)parse(file.substr(0, 2)); }, {"magic at byte 0", "'GG'", "'GGUF'"});
  kvq_test::require_error([&] { (void)parse(file.substr(0, 20)); }, {"truncated", "header needs 24 bytes"});
  const std::size_t tokens_at = find_bytes(file, "tokenizer.ggml.tokens");
  kvq_test::require_error([&] { (void)parse(file.substr(0, tokens_at + 40)); },
                {"truncated", "tokenizer.ggml.tokens"});
  kvq_test::require_error([&] { (void)parse(file.substr(0, file.size() - 1)); },
                {"tensor 'output_norm.weight'", "data offset", "expected offset + size"});
}

TEST_CASE("corrupted GGUF fields raise errors naming them", "[llm][gguf]") {
  const SyntheticModel s = synthetic_model();
  const std::string good = s.builder.build();
  REQUIRE_NOTHROW(load(good));
  const auto corrupt_bytes = [&](const std::function<void(std::string&)>& edit) {
    std::string f = good;
    edit(f);
    return f;
  };
  const auto corrupt = [&](const std::function<void(GgufBuilder&)>& edit) {
    GgufBuilder b = s.builder;
    edit(b);
    return b.build();
  };
  const auto fails = [&](const std::string& file, std::initializer_list<std::string> fragments) {
    kvq_test::require_error([&] { (void)load(file); }, fragments);
  };

  SECTION("header") {
    fails(corrupt_bytes([](std::string& f) { f[0] = 'X'; }), {"synthetic.gguf", "magic", "'XGUF'"});
    fails(corrupt([](GgufBuilder& b) { b.version = 1; }),
          {"version at byte 4 is 1", "expected 2 or 3"});
    fails(corrupt([](GgufBuilder& b) { b.version = 4; }), {"version at byte 4 is 4"});
    fails(corrupt_bytes([](std::string& f) { patch(f, 4, std::string("\0\0\0\3", 4)); }),
          {"50331648", "big-endian"});
    fails(corrupt_bytes([](std::string& f) { patch(f, 8, u64(1000000000000ull)); }),
          {"tensor count at byte 8 is 1000000000000"});
    fails(corrupt_bytes([](std::string& f) { patch(f, 16, u64(~std::uint64_t{0})); }),
          {"metadata kv count at byte 16 is 18446744073709551615"});
  }
  SECTION("metadata") {
    fails(corrupt_bytes([](std::string& f) {
            patch(f, find_bytes(f, "general.architecture") - 8, u64(0xFFFFFFFFFFFFull));
          }),
          {"key of metadata entry 0", "length 281474976710655"});
    fails(corrupt_bytes([](std::string& f) {
            patch(f, find_bytes(f, "general.name") + 12 + 4, u64(1u << 30));
          }),
          {"value of key 'general.name'", "length 1073741824"});
    fails(corrupt_bytes([](std::string& f) {
            patch(f, find_bytes(f, "tokenizer.ggml.tokens") + 21 + 8, u64(0x7FFFFFFFFFFFull));
          }),
          {"'tokenizer.ggml.tokens'", "140737488355327 elements of type string"});
    fails(corrupt_bytes(
              [](std::string& f) { patch(f, find_bytes(f, "llama.block_count") + 17, u32(13)); }),
          {"value type of key 'llama.block_count'", "is 13"});
    fails(corrupt_bytes([](std::string& f) {
            patch(f, find_bytes(f, "tokenizer.ggml.merges") + 21 + 4, u32(99));
          }),
          {"'tokenizer.ggml.merges'", "element type 99"});
    fails(corrupt_bytes([](std::string& f) {
            patch(f, find_bytes(f, "tokenizer.ggml.add_bos_token") + 28 + 4, "\2");
          }),
          {"'tokenizer.ggml.add_bos_token'", "bool stored as 2"});
    fails(corrupt([](GgufBuilder& b) { b.kvs.emplace_back("llama.block_count", v_u32(2)); }),
          {"'llama.block_count'", "appears twice"});
    fails(corrupt([](GgufBuilder& b) {
            std::string body =
                type_tag(GgufValueType::kUint8) + u64(0);  // element type, count, elements
            for (int i = 0; i < 20; ++i) body = type_tag(GgufValueType::kArray) + u64(1) + body;
            b.set("deep", type_tag(GgufValueType::kArray) + body);
          }),
          {"'deep'", "nests arrays 17 deep"});
    fails(corrupt([](GgufBuilder& b) { b.set("general.alignment", v_u32(48)); }),
          {"general.alignment", "48", "power of two"});
  }
  SECTION("tensor directory") {
    fails(corrupt(
              [](GgufBuilder& b) { b.tensor("blk.1.ffn_up.weight").offset_override = 1ull << 40; }),
          {"'blk.1.ffn_up.weight'", "data offset 1099511627776"});
    fails(corrupt([](GgufBuilder& b) { b.tensor("blk.0.ffn_up.weight").offset_override = 33; }),
          {"'blk.0.ffn_up.weight'", "data offset 33", "multiple of the alignment 32"});
    fails(corrupt([](GgufBuilder& b) { b.tensor("blk.0.attn_v.weight").type = 99; }),
          {"'blk.0.attn_v.weight'", "ggml type 99"});
    fails(corrupt([](GgufBuilder& b) {
            b.tensor("blk.0.attn_v.weight").dims = {32, 16, 1, 1, 1};
          }),
          {"'blk.0.attn_v.weight'", "5 dimensions"});
    fails(corrupt([](GgufBuilder& b) {
            b.tensor("blk.0.attn_q.weight").dims = {16, 64};
          }),
          {"'blk.0.attn_q.weight'", "q4_1", "ne[0] = 16", "block size 32"});
    fails(corrupt([](GgufBuilder& b) { b.tensors.push_back(b.tensors[2]); }),
          {"'blk.0.attn_q.weight'", "name of an earlier tensor"});
    fails(corrupt([](GgufBuilder& b) {
            b.tensor("blk.0.attn_q.weight").dims = {std::uint64_t{1} << 62, 8};
          }),
          {"'blk.0.attn_q.weight'", "overflows"});
  }
  SECTION("model") {
    fails(corrupt([](GgufBuilder& b) { b.set("general.architecture", v_str("qwen2")); }),
          {"general.architecture = 'qwen2'", "expected 'llama'"});
    fails(corrupt([](GgufBuilder& b) { b.erase_key("general.architecture"); }),
          {"'general.architecture'", "missing"});
    fails(corrupt([](GgufBuilder& b) { b.set("llama.block_count", v_str("two")); }),
          {"'llama.block_count'", "string 'two'", "uint32"});
    fails(corrupt([](GgufBuilder& b) { b.erase_key("llama.attention.layer_norm_rms_epsilon"); }),
          {"'llama.attention.layer_norm_rms_epsilon'", "missing"});
    fails(corrupt([](GgufBuilder& b) { b.set("llama.attention.head_count_kv", v_u32(3)); }),
          {"llama.attention.head_count_kv = 3"});
    fails(corrupt([](GgufBuilder& b) { b.set("llama.rope.dimension_count", v_u32(8)); }),
          {"llama.rope.dimension_count = 8", "head_dim = 16"});
    fails(corrupt([](GgufBuilder& b) { b.set("llama.block_count", v_u32(3)); }),
          {"'blk.2.attn_norm.weight' is missing"});
    fails(corrupt([](GgufBuilder& b) { b.set("llama.block_count", v_u32(4000000000u)); }),
          {"llama.block_count"});
    fails(corrupt([](GgufBuilder& b) { b.erase_tensor("blk.1.ffn_norm.weight"); }),
          {"tensor 'blk.1.ffn_norm.weight' is missing", "[32]"});
    fails(corrupt([](GgufBuilder& b) {
            b.tensor("blk.1.ffn_up.weight").dims = {64, 32};
          }),
          {"tensor 'blk.1.ffn_up.weight' has dims [64, 32]", "expected [32, 64]"});
    fails(corrupt([](GgufBuilder& b) {
            b.tensor("token_embd.weight").dims = {64, 130};
          }),
          {"'token_embd.weight'", "[64, 130]"});
    fails(corrupt([](GgufBuilder& b) { b.set("llama.vocab_size", v_u32(261)); }),
          {"llama.vocab_size = 261", "260"});
    fails(corrupt([](GgufBuilder& b) { b.set("tokenizer.ggml.model", v_str("llama")); }),
          {"tokenizer.ggml.model = 'llama'", "'gpt2'"});
    fails(corrupt([](GgufBuilder& b) { b.set("tokenizer.ggml.pre", v_str("qwen2")); }),
          {"tokenizer.ggml.pre = 'qwen2'"});
    fails(corrupt([](GgufBuilder& b) {
            b.set("tokenizer.ggml.merges", v_str_array({"h e", "Ġ x"}));
          }),
          {"tokenizer.ggml.merges[1] = 'Ġ x'", "not a token"});
    fails(corrupt([](GgufBuilder& b) { b.set("tokenizer.ggml.bos_token_id", v_u32(260)); }),
          {"tokenizer.ggml.bos_token_id = 260"});
    fails(corrupt([](GgufBuilder& b) {
            b.set("tokenizer.ggml.token_type", v_i32_array({1, 1}));
          }),
          {"tokenizer.ggml.token_type has 2 entries", "260"});
    fails(corrupt([](GgufBuilder& b) {
            auto t = synthetic_tokens();
            t.pop_back();
            b.set("tokenizer.ggml.tokens", v_str_array(t));
            b.erase_key("tokenizer.ggml.token_type");
            b.set("tokenizer.ggml.merges", v_str_array({}));
          }),
          {"tokenizer.ggml.tokens has 259 entries", "260"});
  }
  SECTION("weights") {
    fails(corrupt([](GgufBuilder& b) {
            patch(b.tensor("blk.1.attn_norm.weight").data, 4 * 5, f32_bits(std::nanf("")));
          }),
          {"tensor 'blk.1.attn_norm.weight'", "non-finite", "element 5"});
    fails(corrupt([](GgufBuilder& b) {
            patch(b.tensor("blk.0.attn_k.weight").data, 34 * 3, le(0x7C00, 2));
          }),
          {"tensor 'blk.0.attn_k.weight'", "q8_0", "non-finite", "element 96", "row 3, column 0"});
    fails(corrupt([](GgufBuilder& b) {
            patch(b.tensor("blk.0.attn_v.weight").data, 2 * 40, le(0xFC00, 2));  // fp16 -inf
          }),
          {"tensor 'blk.0.attn_v.weight'", "-inf", "element 40", "row 1, column 8"});
    const std::string q5 = corrupt([](GgufBuilder& b) {
      TensorSpec& t = b.tensor("blk.0.attn_output.weight");
      t.type = 6;  // q5_0: 22 bytes per 32 elements
      t.data.assign(32 * 22, '\0');
    });
    kvq_test::require_error([&] { (void)load(q5); },
                  {"tensor 'blk.0.attn_output.weight'", "type q5_0", "q4_1"});
    try {
      (void)load(q5);
    } catch (const kvq::Error& e) {
      REQUIRE(e.status() == kvq::Status::kUnsupported);
    }
  }
}

TEST_CASE("GgufFile::open reports files it cannot read", "[llm][gguf]") {
  const std::filesystem::path dir = std::filesystem::temp_directory_path() / "kvq_test_gguf";
  std::filesystem::create_directories(dir);
  const std::string missing = (dir / "missing.gguf").string();
  std::filesystem::remove(missing);
  try {
    (void)GgufFile::open(missing);
    FAIL("no kvq::Error");
  } catch (const kvq::Error& e) {
    REQUIRE(e.status() == kvq::Status::kIoError);
    REQUIRE(std::string(e.what()).find(missing) != std::string::npos);
  }
  kvq_test::require_error([&] { (void)GgufFile::open(dir.string()); }, {dir.string(), "not a regular file"});

  const SyntheticModel s = synthetic_model();
  const std::string path = (dir / "tiny-llama.gguf").string();
  {
    const std::string bytes = s.builder.build();
    std::ofstream(path, std::ios::binary)
        .write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }
  const auto loaded = kvq::llm::load_gguf_model(path);
  REQUIRE(loaded.model.name == "Tiny Llama");
  GgufBuilder unnamed = s.builder;
  unnamed.erase_key("general.name");
  {
    const std::string bytes = unnamed.build();
    std::ofstream(path, std::ios::binary)
        .write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }
  REQUIRE(kvq::llm::load_gguf_model(path).model.name == "tiny-llama");
  std::filesystem::remove(path);
}
