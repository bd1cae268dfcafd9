#!/usr/bin/env bash
# Installs aifs under a prefix (default /usr/local), for `mount -t fuse.aifs`,
# fstab and systemd:
#   PREFIX/bin/aifs-mountd          the daemon (a release build, made here)
#   PREFIX/bin/aifs                 the same binary under the name fuse3's
#                                   mount.fuse3 runs for `-t fuse.aifs`
#   PREFIX/lib/aifs/                the ONNX Runtime library it loads
#   PREFIX/lib/systemd/system/aifs.service
#   PREFIX/share/doc/aifs/          README.md, PROTOCOL.md
# mount(8) runs helpers with PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:
# /usr/bin:/sbin:/bin, so `mount -t fuse.aifs` needs a prefix on it.
#
#   scripts/install.sh [--prefix DIR] [--binary PATH]
#     --binary PATH   install this aifs-mountd instead of building release
set -euo pipefail

usage() { echo "usage: scripts/install.sh [--prefix DIR] [--binary PATH]" >&2; exit 2; }
prefix=/usr/local
binary=
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) [ $# -ge 2 ] || usage; prefix="$2"; shift 2 ;;
    --binary) [ $# -ge 2 ] || usage; binary="$2"; shift 2 ;;
    *) usage ;;
  esac
done
# Paths given relative to where this was run from, before moving to the checkout.
prefix=$(realpath -m "$prefix")
[ -z "$binary" ] || binary=$(realpath "$binary")
case "$prefix" in
  *[[:space:]\\\|\&]*) echo "install.sh: the prefix may not contain spaces, |, & or backslashes: $prefix" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."

scripts/setup.sh
if [ -z "$binary" ]; then
  cargo build --release --locked -p aifs-mountd
  binary=target/release/aifs-mountd
fi
lib=.deps/onnxruntime/onnxruntime/capi/libonnxruntime.so.$(sed -n 's/^ORT_VERSION=//p' scripts/setup.sh)

install -d "$prefix/bin" "$prefix/lib/aifs" "$prefix/lib/systemd/system" "$prefix/share/doc/aifs"
install -m 0755 "$binary" "$prefix/bin/aifs-mountd"
ln -sfn aifs-mountd "$prefix/bin/aifs"
install -m 0644 "$lib" "$prefix/lib/aifs/"
sed "s|/usr/local|$prefix|g" deploy/systemd/aifs.service > "$prefix/lib/systemd/system/aifs.service"
chmod 0644 "$prefix/lib/systemd/system/aifs.service"
install -m 0644 README.md docs/PROTOCOL.md "$prefix/share/doc/aifs/"
echo "installed aifs into $prefix"
