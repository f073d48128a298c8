#!/bin/busybox sh
# PID 1 of the vm-test guest: mount the pseudo file systems, run the payload's run.sh, print
# the end marker on the console and power off. Test results go to the second serial port
# (/dev/ttyS1) so they never mix with kernel messages.
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
echo "VMTEST-BOOTED kernel=$(uname -r) uptime=$(cut -d' ' -f1 /proc/uptime)"
sh /detector/run.sh
RC=$?
echo "VMTEST-END rc=$RC uptime=$(cut -d' ' -f1 /proc/uptime)"
echo "VMTEST-END rc=$RC" > /dev/ttyS1
sync
poweroff -f
