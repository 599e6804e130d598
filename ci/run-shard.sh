#!/usr/bin/env bash
# One cell of the nightly matrix: the scenarios of one architecture, one shard
# of them. CI and developers run exactly this:
#
#     ci/run-shard.sh x86_64 2/4            # shard 2 of 4 of the x86_64 runs
#     ci/run-shard.sh ppc64le 1/1           # all ppc64le runs
#
# It installs what is missing (guest target, QEMU: apt as root or with
# passwordless sudo), runs the shard, and leaves in target/ci/<arch>-<i>-of-<n>/
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
out="target/ci/${arch}-${shard%/*}-of-${shard#*/}"
mkdir -p "$out"

rustup toolchain install    # the toolchain rust-toolchain.toml names; a no-op when present
cargo xtask setup --arch "$arch"
exec cargo xtask run-scenarios --arch "$arch" --shard "$shard" \
    --junit "$out/junit.xml" --json "$out/results.json" "$@"
