#!/usr/bin/env bash
# One cell of the nightly matrix: the scenarios of one architecture, one shard
# of them. CI and developers run exactly this:
#
#     ci/run-shard.sh x86_64 2/4            # shard 2 of 4 of the x86_64 runs
#     ci/run-shard.sh ppc64le 1/1           # all ppc64le runs
#     QEMU=backports ci/run-shard.sh aarch64 1/3   # under Debian backports' QEMU 10
#
# QEMU (default distro) picks the emulator: `distro`, the distribution's on
# PATH, or `backports`, bookworm-backports' unpacked under target/qemu/ by
# `cargo xtask setup --qemu backports` (fetched once, then cached).
#
# It installs what is missing (guest target, QEMU: apt as root or with
# passwordless sudo), runs the shard, and leaves in target/ci/<arch>-<qemu>-<i>-of-<n>/
# the JUnit and JSON reports; failing runs' artifacts are under
# target/scenario-logs/. The exit status is run-scenarios': 0 all passed,
# 1 a scenario failed (or was flaky), 2 the harness could not run one.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -lt 2 || ! $2 =~ ^[0-9]+/[0-9]+$ ]]; then
    echo "usage: ci/run-shard.sh ARCH I/N [extra run-scenarios arguments]" >&2
    exit 2
fi
arch=$1
shard=$2
shift 2
qemu=${QEMU:-distro}
out="target/ci/${arch}-${qemu}-${shard%/*}-of-${shard#*/}"
mkdir -p "$out"

rustup toolchain install    # the toolchain rust-toolchain.toml names; a no-op when present
cargo xtask setup --arch "$arch" --qemu "$qemu"
exec cargo xtask run-scenarios --qemu "$qemu" --arch "$arch" --shard "$shard" \
    --junit "$out/junit.xml" --json "$out/results.json" "$@"
