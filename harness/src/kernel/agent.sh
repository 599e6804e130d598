#!/bin/sh
# hvo-harness agent: /init (PID 1) of the initramfs the harness writes for a
# real Linux kernel, run by busybox-static's sh. It speaks the console line
# protocol of abi/src/protocol.rs:
#   "@hvo ready abi=<n> arch=<name>" once, then for each "<seq> <verb> [args]"
#   line read, one "@hvo <seq> ok [payload]" or "@hvo <seq> err <message>"
#   ("@hvo - err ..." when the line carries no sequence number).
# Everything else printed is free text. Replies stay under 480 bytes.
#
# The host's unit tests run this same script under the host's sh against a
# fake /proc and /sys: HVO_AGENT_ROOT prefixes every kernel path, and the
# PID 1 set-up (mounts, console, poweroff) happens only when it is unset.
ABI=@ABI@
R=${HVO_AGENT_ROOT:-}
export PATH=/bin:$PATH

if [ -z "$R" ]; then
  mount -t proc proc /proc
  mount -t sysfs sys /sys
  mount -t devtmpfs dev /dev 2>/dev/null
  # printk on the console would split reply lines: keep only emergencies.
  echo 1 > /proc/sys/kernel/printk
  exec </dev/console >/dev/console 2>&1
  stty -echo 2>/dev/null
  # The firmware's or kernel's last console output may end without a
  # newline (pseries' VOF): the banner must start a line of its own.
  echo
fi

HUGEPAGES=$R/sys/kernel/mm/hugepages
SYSCTL=$R/proc/sys/vm/hugetlb_optimize_vmemmap
BTF=$R/sys/kernel/btf/vmlinux
# The kernel's base page size, in KiB, as the kernel maps this very process.
PAGE_KB=$(awk '/^KernelPageSize:/ {print $2; exit}' $R/proc/self/smaps)
read RELEASE < $R/proc/sys/kernel/osrelease
MACHINE=$(uname -m)
# The project's name for this kernel's architecture, so the host can tell a
# kernel that does not match the profile it meant to boot.
case "$MACHINE.$PAGE_KB" in
  x86_64.4) ARCH=x86_64 ;;
  aarch64.4) ARCH=aarch64 ;;
  ppc64le.4) ARCH=ppc64le ;;
  ppc64le.64) ARCH=ppc64le-64k ;;
  *) ARCH=unknown-$MACHINE-${PAGE_KB}k ;;
esac

SEQ=-
reply() { echo "@hvo $SEQ $*"; }

sysctl_hvo() {
  if [ -r $SYSCTL ]; then cat $SYSCTL; else echo absent; fi
}

# "2048:64:64,1048576:1:1": size in KiB, pages, free pages, per hstate.
hstates() {
  out=
  for d in $HUGEPAGES/hugepages-*kB; do
    [ -d "$d" ] || continue
    size=${d##*/hugepages-}
    read nr < $d/nr_hugepages
    read free < $d/free_hugepages
    out=$out${out:+,}${size%kB}:$nr:$free
  done
  echo "$out"
}

# "2048,1048576": the hstate sizes in KiB.
hstate_sizes() {
  out=
  for d in $HUGEPAGES/hugepages-*kB; do
    [ -d "$d" ] || continue
    size=${d##*/hugepages-}
    out=$out${out:+,}${size%kB}
  done
  echo "$out"
}

# " nr_memmap_pages=N nr_memmap_boot_pages=N", what /proc/vmstat has of them.
memmap_counts() {
  awk '/^nr_memmap_pages / || /^nr_memmap_boot_pages / {printf " %s=%s", $1, $2; if (++n == 2) exit}' $R/proc/vmstat
}

is_number() {
  case "$1" in ''|*[!0-9]*) return 1 ;; *) return 0 ;; esac
}

# hugetlb_resize VERB SIZE_KB COUNT SIGN: grow or shrink an hstate's pool by
# COUNT pages; a pool that moved by less is put back and refused.
hugetlb_resize() {
  verb=$1 kb=$2 count=$3 sign=$4
  if ! is_number "$kb" || ! is_number "$count"; then reply err "$verb: bad size or count"; return; fi
  f=$HUGEPAGES/hugepages-${kb}kB/nr_hugepages
  if [ ! -w $f ]; then reply err "$verb: no ${kb}kB hstate"; return; fi
  read before < $f
  want=$((before + sign * count))
  echo $want > $f 2>/dev/null
  read after < $f
  if [ "$after" != "$want" ]; then
    echo $before > $f 2>/dev/null
    reply err "$verb: ${kb}kB pool moved $before -> $after of $want"
  else
    reply ok size_kb=$kb nr=$after
  fi
}

echo "@hvo ready abi=$ABI arch=$ARCH"
while read -r SEQ VERB ARGS; do
  if [ -z "$SEQ" ]; then continue; fi
  if ! is_number "$SEQ"; then SEQ=-; reply err command must start with a sequence number; continue; fi
  # Arguments are words: no glob expansion of what the host sent.
  set -f; set -- $ARGS; set +f
  case "$VERB" in
    ping)
      reply ok pong${1:+ $1} ;;
    kernel)
      btf=no; [ -r $BTF ] && btf=yes
      reply ok release=$RELEASE machine=$MACHINE page_kb=$PAGE_KB hvo=$(sysctl_hvo) hstates=$(hstate_sizes) btf=$btf ;;
    report)
      reply ok hvo=$(sysctl_hvo)$(memmap_counts) hstates=$(hstates) ;;
    hugetlb-alloc)
      # Optimization applies to pages allocated after the sysctl says so.
      if [ -w $SYSCTL ] && ! echo 1 > $SYSCTL; then reply err "hugetlb-alloc: cannot turn hugetlb_optimize_vmemmap on"
      else hugetlb_resize hugetlb-alloc "$1" "$2" 1; fi ;;
    hugetlb-free)
      hugetlb_resize hugetlb-free "$1" "$2" -1 ;;
    ksyms)
      # One pass over kallsyms that stops once every wanted name was seen:
      # the file is 200k lines and slow to generate under TCG.
      if [ $# -eq 0 ]; then reply err "ksyms: missing symbol names"; continue; fi
      found=$(awk -v want="$*" '
        BEGIN { n = split(want, w, " "); for (i = 1; i <= n; i++) need[w[i]] = 1 }
        ($3 in need) { printf " %s=0x%s", $3, $1; delete need[$3]; if (--n == 0) exit }' $R/proc/kallsyms)
      reply ok$found ;;
    btf-has)
      if [ -z "$1" ]; then reply err "btf-has: missing name"
      elif [ ! -r $BTF ]; then reply err "btf-has: the kernel has no BTF"
      elif tr '\000' '\n' < $BTF | grep -qxF "$1"; then reply ok $1=yes
      else reply ok $1=no; fi ;;
    exit)
      reply ok
      if [ -z "$R" ]; then sync; poweroff -f; fi
      exit 0 ;;
    *)
      reply err "unknown command '$VERB'" ;;
  esac
done
echo "@hvo crash: console closed"
if [ -z "$R" ]; then poweroff -f; fi
exit 1
