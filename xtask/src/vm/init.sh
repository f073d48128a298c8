#!/bin/busybox sh
# PID 1 of the vm-test guest: mount the pseudo file systems, run the payload's run.sh, print
# the end marker on the console and power off. Test results go to a port of their own
# (vmtest.results= on the kernel command line: the second serial port on amd64, a virtio
# console on arm64, whose board has one UART) so they never mix with kernel messages.
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug
mkdir -p /run/netns
RESULTS=$(sed -n 's/.*vmtest\.results=\([^ ]*\).*/\1/p' /proc/cmdline)
export VMTEST_RESULTS=${RESULTS:-/dev/ttyS1}
if [ ! -e "$VMTEST_RESULTS" ]; then
  # The virtio console's driver is a module in Debian's arm64 kernel.
  modprobe -a virtio_mmio virtio_console
  i=0
  while [ ! -e "$VMTEST_RESULTS" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
fi
echo "VMTEST-BOOTED kernel=$(uname -r) uptime=$(cut -d' ' -f1 /proc/uptime)"
sh /detector/run.sh
RC=$?
echo "VMTEST-END rc=$RC uptime=$(cut -d' ' -f1 /proc/uptime)"
echo "VMTEST-END rc=$RC" > "$VMTEST_RESULTS"
sync
poweroff -f
