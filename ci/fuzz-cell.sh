#!/usr/bin/env bash
# One fuzz cell of the nightly matrix: random scenarios on one profile for a
# time budget, from a seed that is the date, so every night draws new
# scenarios and any night can be drawn again. CI and developers run exactly
# this:
#
#     ci/fuzz-cell.sh ppc64le-64k                        # today's seed, 20 minutes
#     SEED=20261201 ci/fuzz-cell.sh x86_64               # the night of 2026-12-01 again
#     SEED=20261201 BUDGET=5m ci/fuzz-cell.sh aarch64 -j 1
#
# SEED (default: today's UTC date, YYYYMMDD), BUDGET (default 20m: no
# scenario starts after it) and QEMU (distro or backports) may be set; more
# arguments go to `cargo xtask fuzz`. A time budget draws as many scenarios
# as the machine gets through: the last lines printed (and summary.json)
# name the exact range, with a `replay:` command that draws the same ones.
#
# Each failure is shrunk, tried on the other three profiles (so all four are
# set up), and written with the commands that reproduce it to
# target/ci/fuzz-<arch>/, beside summary.json; failing runs' artifacts go to
# target/fuzz-logs/. The exit status is fuzz's: 0 nothing failed, 1 a
# scenario failed, 2 the harness could not run.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -lt 1 ]]; then
    echo "usage: [SEED=YYYYMMDD] [BUDGET=20m] ci/fuzz-cell.sh ARCH [extra fuzz arguments]" >&2
    exit 2
fi
arch=$1
shift
seed=${SEED:-$(date -u +%Y%m%d)}
budget=${BUDGET:-20m}
qemu=${QEMU:-distro}
out="target/ci/fuzz-${arch}"
mkdir -p "$out"
echo "fuzz cell: seed $seed, $budget on $arch (QEMU $qemu)"
echo "this night again: SEED=$seed BUDGET=$budget QEMU=$qemu ci/fuzz-cell.sh $arch"

rustup toolchain install    # the toolchain rust-toolchain.toml names; a no-op when present
cargo xtask setup --qemu "$qemu"
exec cargo xtask fuzz --qemu "$qemu" --seed "$seed" --time "$budget" --arch "$arch" --out "$out" "$@"
