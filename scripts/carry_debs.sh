#!/usr/bin/env bash
# On the build machine (Debian bookworm, with apt and network): downloads the Debian packages that
# the Llama runtime (tools/llm: kvq_llm, and with it kvq_test_cuda_runtime) needs and the GPU
# machine lacks, into .debs/ of the repository (ignored through .git/info/exclude), so that a
# device run can carry them (carry: [".debs"]) and scripts/unpack_debs.sh can unpack them there
# with dpkg -x into a prefix (never /).
#
#   bash scripts/carry_debs.sh          -> .debs/*.deb (about 3 MB), listed on stdout
#
# Needed (headers, .pc files, the .so link and the shared library, nothing else):
#   libpcre2-dev libpcre2-8-0   pcre2.h, libpcre2-8.pc, libpcre2-8.so -> libpcre2-8.so.0 (the BPE
#                               pre-tokenizer regex); the .so links of pcre2-16/32/posix that
#                               libpcre2-dev also ships stay dangling: nothing uses them
#   nettle-dev libnettle8       nettle/sha2.h, nettle.pc, libnettle.so -> libnettle.so.8 (sha256
#                               of model and text files); hogweed and gmp are not used
# Fallbacks, unpacked only where the GPU machine lacks them (it had fmt 9.1.0 when STYLE.md was
# written; CLI11 and pkg-config were never checked there):
#   libcli11-dev                CLI11 headers and CLI11Config.cmake (tools/CMakeLists.txt needs
#                               CLI11 before it builds kvq_llm)
#   libfmt-dev libfmt9          fmt 9.1.0
#   pkgconf pkgconf-bin libpkgconf3   pkg-config, how tools/CMakeLists.txt finds PCRE2 and Nettle
# These are bookworm builds (glibc 2.36); they load on Ubuntu 24.04's glibc 2.39.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=.debs
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qxF "/$dir/" "$exclude" 2>/dev/null || echo "/$dir/" >>"$exclude"

packages=(libpcre2-dev libpcre2-8-0 nettle-dev libnettle8
          libcli11-dev libfmt-dev libfmt9 pkgconf pkgconf-bin libpkgconf3)
mkdir -p "$dir"
rm -f "$dir"/*.deb
# amd64 packages whatever this machine is (the GPU machine is x86-64).
(cd "$dir" && apt-get -q -o APT::Architecture=amd64 download "${packages[@]}") >&2
for p in "${packages[@]}"; do
  compgen -G "$dir/${p}_*.deb" >/dev/null || { echo "carry_debs: $p was not downloaded" >&2; exit 1; }
done
ls -1 "$dir"/*.deb
du -sh "$dir" >&2
