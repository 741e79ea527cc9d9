#!/usr/bin/env bash
# On the GPU machine (no network, no PCRE2, no Nettle): unpacks the Debian packages that
# scripts/carry_debs.sh put in .debs/ into a prefix (default /tmp/debroot; never /, where they
# could replace Ubuntu's own libraries), points their .pc files at it, and writes ROOT/env.sh,
# which sets what `cmake --preset gpu` (scripts/gpu_check.sh) needs to find PCRE2 and Nettle there:
#
#   bash scripts/unpack_debs.sh [ROOT] && source /tmp/debroot/env.sh
#
# env.sh exports PKG_CONFIG_PATH (ROOT's .pc folders first), CMAKE_PREFIX_PATH (ROOT/usr: CLI11
# and fmt configs when unpacked), KVQ_DEBROOT, and PKG_CONFIG (a wrapper of the carried pkgconf)
# when the machine has no pkg-config; gpu_check.sh builds the tools when that pkg-config finds
# libpcre2-8 and nettle. It does not export LD_LIBRARY_PATH: CMake links the libraries by their full paths under ROOT and puts ROOT's
# library folder in the build tree's RUNPATH, and a global LD_LIBRARY_PATH would also hand
# Debian's libnettle 3.8 to Ubuntu's own programs (linked against 3.9). KVQ_DEB_LIBDIR names the
# folder for a program run outside the build tree (LD_LIBRARY_PATH=$KVQ_DEB_LIBDIR prog).
#
# The fallbacks (CLI11, fmt, pkg-config) are unpacked only when the machine lacks them; the output
# says what was unpacked and what pkg-config now reports for libpcre2-8 and nettle.
set -euo pipefail
cd "$(dirname "$0")/.."

root="${1:-/tmp/debroot}"
case "$root" in
  /|/usr|/usr/*|"") echo "unpack_debs: refusing to unpack into '$root' (use a folder of its own, e.g. /tmp/debroot)" >&2; exit 1 ;;
esac
debs=.debs
compgen -G "$debs/*.deb" >/dev/null || { echo "unpack_debs: no $debs/*.deb (run scripts/carry_debs.sh on the build machine, carry .debs)" >&2; exit 1; }
mkdir -p "$root"
root="$(cd "$root" && pwd)"
libdir="$root/usr/lib/x86_64-linux-gnu"

has_header() {  # a header in the compiler's usual places
  local h
  for h in "/usr/include/$1" "/usr/local/include/$1"; do [ -e "$h" ] && return 0; done
  return 1
}
unpack=(libpcre2-dev libpcre2-8-0 nettle-dev libnettle8)
has_header CLI/CLI.hpp || unpack+=(libcli11-dev)
has_header fmt/core.h || unpack+=(libfmt-dev libfmt9)
system_pkg_config="$(command -v pkg-config || true)"
if [ -n "$system_pkg_config" ] && ! "$system_pkg_config" --version >/dev/null 2>&1; then system_pkg_config=""; fi
[ -n "$system_pkg_config" ] || unpack+=(pkgconf pkgconf-bin libpkgconf3)

for p in "${unpack[@]}"; do
  f="$(compgen -G "$debs/${p}_*.deb" | head -1 || true)"
  [ -n "$f" ] || { echo "unpack_debs: $debs has no ${p}_*.deb" >&2; exit 1; }
  dpkg -x "$f" "$root"
  echo "unpack_debs: $(basename "$f") -> $root" >&2
done

# The .pc files say prefix=/usr: point them at ROOT (every other path in them is ${prefix}-relative).
for pc in "$libdir"/pkgconfig/*.pc "$root"/usr/share/pkgconfig/*.pc; do
  [ -e "$pc" ] || continue
  sed -i -E "s#^prefix=/usr\$#prefix=$root/usr#" "$pc"
  if grep -qE '^(libdir|includedir)=/usr' "$pc"; then echo "unpack_debs: $pc has absolute paths" >&2; exit 1; fi
done

pkg_config="$system_pkg_config"
if [ -z "$pkg_config" ]; then
  # The carried pkgconf finds libpkgconf.so.3 through its own LD_LIBRARY_PATH only.
  mkdir -p "$root/bin"
  cat >"$root/bin/pkg-config" <<EOF
#!/bin/sh
LD_LIBRARY_PATH="$libdir\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$root/usr/bin/pkgconf" "\$@"
EOF
  chmod +x "$root/bin/pkg-config"
  pkg_config="$root/bin/pkg-config"
fi

{
  echo "# written by scripts/unpack_debs.sh: source it before configuring kvq"
  echo "export KVQ_DEBROOT='$root'"
  echo "export KVQ_DEB_LIBDIR='$libdir'"
  echo "export PKG_CONFIG_PATH='$libdir/pkgconfig:$root/usr/share/pkgconfig'\${PKG_CONFIG_PATH:+:\$PKG_CONFIG_PATH}"
  echo "export CMAKE_PREFIX_PATH='$root/usr'\${CMAKE_PREFIX_PATH:+:\$CMAKE_PREFIX_PATH}"
  [ -n "$system_pkg_config" ] || echo "export PKG_CONFIG='$pkg_config'"
} >"$root/env.sh"
cat "$root/env.sh"

# What CMake's pkg_check_modules will see.
(
  # shellcheck disable=SC1091
  source "$root/env.sh"
  echo "unpack_debs: $pkg_config --cflags --libs libpcre2-8 nettle: $("$pkg_config" --cflags --libs libpcre2-8 nettle)" >&2
)
