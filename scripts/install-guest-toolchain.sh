#!/usr/bin/env bash
# Installs what compiling Rust to WebAssembly components (target
# wasm32-wasip2) needs, and writes how to call it:
#   target/guest-toolchain.toml  the cargo config guest crates build with
#   target/guest-toolchain.env   the way chosen, the cargo and rustc to run,
#                                and whether they need RUSTC_BOOTSTRAP
# (scripts/build-guests.sh reads both). Two ways, tried in order:
#   rustup   `rustup target add wasm32-wasip2`: rustup's prebuilt std.
#   debian   where rustup cannot download the target (some machines answer
#            404 for it): Debian 12's rustc-web, cargo-web, rust-web-src and
#            wasi-libc from apt (bookworm-security), lld of the same LLVM, std
#            built from source by cargo (-Zbuild-std, RUSTC_BOOTSTRAP=1), and
#            wasm-component-ld from rustup's host toolchain or crates.io.
# The way found is kept (in the env file) and checked again on later runs;
# GPUWASM_GUEST_TOOLCHAIN=rustup|debian forces one. Both give components
# that run here; debian's link wasi-libc for preview 1 through an adapter,
# so they import a little more of WASI 0.2. A second run checks and returns
# in about a second. Progress goes to stderr.
# Usage: scripts/install-guest-toolchain.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
target=wasm32-wasip2
host=$(rustc -vV 2>/dev/null | sed -n 's/^host: //p' || true)
config=$root/target/guest-toolchain.toml
envfile=$root/target/guest-toolchain.env
forced=${GPUWASM_GUEST_TOOLCHAIN:-}
mode=${forced:-$(sed -n 's/^GUEST_MODE=//p' "$envfile" 2>/dev/null || true)}
mkdir -p "$root/target"
log() { echo "install-guest-toolchain: $*" >&2; }
die() { log "$*"; exit 1; }
case $mode in rustup | debian | "") ;; *) die "GPUWASM_GUEST_TOOLCHAIN must be rustup or debian, not '$mode'" ;; esac

apt_updated=
apt_install() { # the packages among "$@" that are missing
  local missing=() p
  for p in "$@"; do
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" = "install ok installed" ] || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  [ "$(id -u)" = 0 ] || die "needs root to apt-get install ${missing[*]}"
  if [ -z "$apt_updated" ]; then apt-get update -qq >&2; apt_updated=1; fi
  log "apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

rustup_has_target() {
  command -v rustup >/dev/null && rustup target list --installed 2>/dev/null | grep -x "$target" >/dev/null
}

if [ "$mode" != debian ]; then
  if rustup_has_target; then
    mode=rustup
  elif command -v rustup >/dev/null && timeout 300 rustup target add "$target" >/dev/null 2>"$root/target/rustup-target.err"; then
    log "rustup target add $target: done"
    mode=rustup
  elif [ "$forced" = rustup ]; then
    die "rustup cannot add $target: $(head -c 300 "$root/target/rustup-target.err" 2>/dev/null)"
  else
    log "rustup cannot add $target ($(grep -m1 -o 'error: .*' "$root/target/rustup-target.err" 2>/dev/null | head -c 160)); using Debian's packages"
    mode=debian
  fi
fi

case $mode in
  rustup)
    printf '# Written by scripts/install-guest-toolchain.sh (rustup).\n[build]\ntarget = "%s"\n' "$target" >"$config"
    printf 'GUEST_MODE=rustup\nGUEST_CARGO=%s\nGUEST_RUSTC=%s\nGUEST_BOOTSTRAP=\n' "$(command -v cargo)" "$(command -v rustc)" >"$envfile"
    ;;
  debian)
    apt_install rustc-web cargo-web rust-web-src wasi-libc
    /usr/bin/rustc --print target-list | grep -x "$target" >/dev/null || die "$(/usr/bin/rustc -V) does not know $target"
    # The wasip2 crate needs 1.87; bookworm's main archive has 1.85,
    # bookworm-security newer ones: an old one installed earlier is upgraded.
    minor() { /usr/bin/rustc -V | sed -E 's/^rustc 1\.([0-9]+).*/\1/'; }
    if [ "$(minor)" -lt 87 ]; then
      log "$(/usr/bin/rustc -V) is too old for the wasip2 crate (1.87): upgrading"
      apt-get update -qq >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rustc-web cargo-web rust-web-src >&2
      [ "$(minor)" -ge 87 ] || die "$(/usr/bin/rustc -V) is too old (1.87 or later: is bookworm-security in the apt sources?)"
    fi
    [ -f /usr/lib/rustlib/src/rust/library/Cargo.lock ] || die "rust-web-src did not install the standard library's source"
    [ -f /usr/lib/wasm32-wasi/libc.a ] || die "wasi-libc did not install /usr/lib/wasm32-wasi/libc.a"
    llvm=$(/usr/bin/rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
    apt_install "lld-$llvm"
    wasm_ld=/usr/bin/wasm-ld-$llvm
    [ -x "$wasm_ld" ] || die "lld-$llvm did not install $wasm_ld"
    # Debian has no wasm-component-ld: rustup's host toolchain has one,
    # else crates.io builds it (about 2 minutes).
    linker=
    sysroot=$(rustc --print sysroot 2>/dev/null || true)
    for candidate in "$sysroot/lib/rustlib/$host/bin/wasm-component-ld" "$root/target/tools/bin/wasm-component-ld"; do
      [ -x "$candidate" ] && { linker=$candidate; break; }
    done
    if [ -z "$linker" ]; then
      log "cargo install wasm-component-ld (crates.io) into target/tools"
      env -u RUSTFLAGS -u CARGO_TARGET_DIR cargo install --quiet --locked --version 0.5.31 --root "$root/target/tools" wasm-component-ld >&2
      linker=$root/target/tools/bin/wasm-component-ld
    fi
    cat >"$config" <<EOF
# Written by scripts/install-guest-toolchain.sh (debian): Debian's rustc-web
# and std built from source for $target.
[unstable]
build-std = ["std", "panic_abort"]

[build]
target = "$target"

[target.$target]
linker = "$linker"
rustflags = ["-L/usr/lib/wasm32-wasi", "-Clink-arg=--wasm-ld-path=$wasm_ld"]
EOF
    printf 'GUEST_MODE=debian\nGUEST_CARGO=/usr/bin/cargo\nGUEST_RUSTC=/usr/bin/rustc\nGUEST_BOOTSTRAP=1\n' >"$envfile"
    ;;
esac
log "$mode: $config"
