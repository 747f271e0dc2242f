#!/bin/sh
# Builds the `shoal` binary statically linked (glibc, no shared libraries needed at run
# time) and the image `shoal:dev` (or $SHOAL_IMAGE) from it, FROM scratch.
set -eu
cd "$(dirname "$0")/.."
image="${SHOAL_IMAGE:-shoal:dev}"
triple="$(rustc -vV | sed -n 's/^host: //p')"
# A separate target directory: the static build's flags would otherwise rebuild the
# normal one every time.
RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked --bin shoal --target "$triple" --target-dir target/static
context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
cp deploy/Dockerfile "$context/"
cp "target/static/$triple/release/shoal" "$context/shoal"
# The release profile keeps line tables for profiling; the image does without them.
if command -v strip >/dev/null 2>&1; then strip "$context/shoal"; fi
docker build -t "$image" "$context"
echo "built $image"
