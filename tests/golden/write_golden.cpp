// SPDX-License-Identifier: Apache-2.0
// kvq_write_golden [FILE]: runs every golden case (tests/golden/golden_cases.hpp) on the CPU cache
// and writes the records to FILE (default: the checked-in tests/golden/blocks.golden). Run it
// only when a block layout changes on purpose, check the diff, and commit the new file: the
// tests compare the caches against the file, never against a fresh run of this program.
#include <cstdio>
#include <exception>
#include <fstream>
#include <string>

#include "golden_cases.hpp"

int main(int argc, char** argv) {
  const std::string path = argc > 1 ? argv[1] : KVQ_GOLDEN_FILE;
  try {
    using namespace kvq_golden;  // the cases, in the order of blocks.golden
    const std::vector<Record> records = {cpu_record<Fp16>(),      cpu_record<Bf16>(), cpu_record<Kivi2g32>(),
                                         cpu_record<Kivi4g128>(), cpu_record<Skvq>(), cpu_record<Cskv>()};
    std::ofstream out(path);
    if (!out) {
      std::fprintf(stderr, "kvq_write_golden: cannot write %s\n", path.c_str());
      return 1;
    }
    kvq_golden::write_records(out, records);
    out.close();
    if (!out) {
      std::fprintf(stderr, "kvq_write_golden: writing %s failed\n", path.c_str());
      return 1;
    }
    for (const kvq_golden::Record& r : records) {
      std::printf("%-22s %-26s keys %lld quantized (%lld blocks of %lld B), values %lld quantized (%lld blocks of %lld B)\n",
                  r.name.c_str(), r.shape.c_str(), static_cast<long long>(r.keys.quantized),
                  static_cast<long long>(r.keys.blocks), static_cast<long long>(r.keys.block_bytes),
                  static_cast<long long>(r.values.quantized), static_cast<long long>(r.values.blocks),
                  static_cast<long long>(r.values.block_bytes));
    }
    std::printf("wrote %zu cases to %s\n", records.size(), path.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kvq_write_golden: %s\n", e.what());
    return 1;
  }
  return 0;
}
