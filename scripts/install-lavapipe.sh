#!/usr/bin/env bash
# Installs Mesa's software Vulkan driver, lavapipe (Debian packages
# mesa-vulkan-drivers and libvulkan1), so the wgpu backend runs for real on
# a machine without a GPU: the tests run every wgpu kernel and the GPU path
# end to end on it (`serve --gpus software`). lavapipe computes on the CPU,
# slowly: it is for correctness, not speed. Does nothing when the packages
# are present. Prints the Vulkan devices gpuwasm sees.
set -euo pipefail
packages=(mesa-vulkan-drivers libvulkan1)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install-lavapipe: apt-get install ${missing[*]}" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
