#!/usr/bin/env bash
# Installs s3s-fs (crates.io), the S3-compatible server the scale-out tests
# start on loopback (tests/support.rs: S3), into target/tools/bin. s3s-fs
# is small (a few minutes to build here), stores buckets as folders of a
# directory, and implements what gpuwasm's blob store uses: put, get, head,
# list, delete and multipart upload. 0.14.1 is the newest that builds with
# Rust 1.95 (0.17 needs 1.96). Does nothing when it is installed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
version=0.14.1
bin=$root/target/tools/bin/s3s-fs
if [[ -x $bin ]] && [[ $("$bin" --version) == "s3s-fs $version" ]]; then
  exit 0
fi
echo "install-s3s: cargo install s3s-fs@$version" >&2
cargo install --locked --quiet "s3s-fs@$version" --features binary --root "$root/target/tools"
