#!/bin/sh
# The vm-bench guest's run: the overhead part of `xtask bench` (full mode) on every backend that
# loads here, its progress as BENCH-LOG lines and its bench.json as FILE-DATA/FILE-END lines
# (hex; see xtask/src/vm/transport.rs) on the results port, then BENCH-RC with its exit code.
cd /detector
OUT=${VMTEST_RESULTS:-/dev/ttyS1}
# As in run.sh: nf_conntrack and what the bench's topology needs, as modules.
modprobe -a crc32c_generic nf_conntrack nf_defrag_ipv4 nf_defrag_ipv6 nf_conntrack_netlink \
  nf_tables nft_ct veth sch_ingress cls_bpf || echo "modprobe failed"
/detector/bin/detector doctor 2>&1 | while read -r l; do echo "BENCH-LOG doctor: $l" > $OUT; done
# stderr (progress) to the port as it comes, stdout (the markdown) to the console only.
# Full mode (3 interleaved runs of each configuration, about 4 minutes here) without profiles
# (perf is not in the guest) and, inside the guest, no guest of its own.
{ /detector/bin/xtask bench --only overhead --no-profile --no-guest \
    --detector /detector/bin/detector --out-dir /tmp/bench 2>&1 >/tmp/bench.md
  echo $? > /tmp/bench.rc; } |
  while read -r l; do echo "BENCH-LOG $l" > $OUT; echo "$l"; done
rc=$(cat /tmp/bench.rc)
if [ "$rc" = 0 ]; then
  /detector/bin/xtask vm-send /tmp/bench/bench.json > $OUT || rc=send
fi
echo "BENCH-RC $rc" > $OUT
exit 0
