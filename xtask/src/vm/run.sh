#!/bin/sh
# The vm-test guest's checks: every check of /detector/checks for every backend the kernel
# supports, one RESULT line each on the results port (/init exports VMTEST_RESULTS):
#   RESULT <backend|-|auto> <check> <pass|fail|unsupported> <seconds> <detail>
# Backends that do not load get `unsupported` with `detector doctor`'s reason.
# The payload has its own directory: the host's paths mean nothing here (/tmp is a tmpfs).
cd /detector
# The integration tests run the detector binary named here, not the path cargo built it at.
export DETECTOR_BIN=/detector/bin/detector
OUT=${VMTEST_RESULTS:-/dev/ttyS1}
result() { echo "RESULT $*" > $OUT; echo "RESULT $*"; }
# crc32c_generic first: libcrc32c (nf_conntrack's dependency) fails with "unknown symbol"
# without it. nf_conntrack is a module here, as on EKS nodes.
modprobe -a crc32c_generic nf_conntrack nf_defrag_ipv4 nf_defrag_ipv6 nf_conntrack_netlink \
  nf_tables nft_ct veth sch_ingress cls_bpf || echo "modprobe failed"
echo "modules: $(cut -d' ' -f1 /proc/modules | tr '\n' ' ')"
"$DETECTOR_BIN" doctor > /tmp/doctor.txt 2>&1
doctor_rc=$?
echo "== detector doctor (rc $doctor_rc)"; cat /tmp/doctor.txt
auto=$(sed -n 's/^auto picks *//p' /tmp/doctor.txt)
if [ $doctor_rc -eq 0 ] && [ -n "$auto" ]; then
  result auto doctor pass 0 "$auto"
else
  result auto doctor fail 0 "detector doctor rc=$doctor_rc: $(head -c 300 /tmp/doctor.txt | tr '\n' ' ')"
fi

run_check() { # backend check binary test env
  t0=$(cut -d' ' -f1 /proc/uptime)
  extra=""
  [ "$5" = - ] || extra="$5"
  if [ "$1" = - ]; then
    env $extra /detector/tests/$3 --exact "$4" --test-threads=1 --nocapture > /tmp/check.out 2>&1
  else
    env $extra DETECTOR_BACKEND=$1 /detector/tests/$3 --exact "$4" --test-threads=1 --nocapture > /tmp/check.out 2>&1
  fi
  rc=$?
  t1=$(cut -d' ' -f1 /proc/uptime)
  dt=$(awk "BEGIN{printf \"%.1f\", $t1 - $t0}")
  if [ $rc -eq 0 ] && grep -q "test result: ok. 1 passed" /tmp/check.out; then
    note=$(grep -m1 -o 'map writes hook: [a-z]*' /tmp/check.out)
    result "$1" "$2" pass "$dt" "$3::$4${note:+ ($note)}"
  else
    echo "== $1 $2 failed (rc $rc):"; cat /tmp/check.out
    result "$1" "$2" fail "$dt" "$3::$4 rc=$rc: $(grep -m1 -E 'panicked|error' /tmp/check.out | cut -c1-300)"
  fi
}

while read -r scope check bin test env; do
  [ "$scope" = kernel ] || continue
  run_check - "$check" "$bin" "$test" "$env"
done < /detector/checks
for b in fentry kprobe tracepoint; do
  line=$(grep "^  $b " /tmp/doctor.txt)
  ok=$(echo "$line" | awk '{print $2}')
  reason=$(echo "$line" | sed 's/^ *[a-z]* *no *//')
  while read -r scope check bin test env; do
    [ "$scope" = backend ] || continue
    if [ "$ok" != yes ]; then
      result "$b" "$check" unsupported 0 "${reason:-not in detector doctor}"
    else
      run_check "$b" "$check" "$bin" "$test" "$env"
    fi
  done < /detector/checks
done
exit 0
