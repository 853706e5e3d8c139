#!/bin/sh
# /init of the test guest's initramfs (busybox). It loads the virtio + 9p modules, mounts the
# read-only Debian root and two shares from the host, and runs /work/main.py in the root.
# Shares (9p tags): "root" the debootstrap root (ro), "qvc" the repo's connector/guest (ro),
# "work" a per-VM writable directory holding main.py and receiving results.
# When main.py ends the guest powers off, so qemu (-no-reboot) exits: a test is one boot.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod "/modules/$m" || echo "init: insmod $m failed"; done
P9="trans=virtio,version=9p2000.L,msize=262144"
mount -t 9p -o "$P9,ro,cache=loose" root /root || { echo "init: no root share"; poweroff -f; }
mount -t tmpfs tmp /root/tmp
mount -t tmpfs run /root/run
mount -o bind /proc /root/proc
mount -o bind /sys /root/sys
mount -o bind /dev /root/dev
# connector/guest is importable as connector.guest without the rest of the project.
mount -t tmpfs qvc /root/qvc
mkdir -p /root/qvc/connector/guest
echo '"""Only connector.guest is present inside the guest."""' > /root/qvc/connector/__init__.py
mount -t 9p -o "$P9,ro" qvc /root/qvc/connector/guest
mount -t 9p -o "$P9" work /root/work
ip link set lo up
echo "QVC-INIT: running main.py"
chroot /root /usr/bin/env -i PATH=/usr/bin:/bin HOME=/tmp PYTHONPATH=/qvc \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 /usr/bin/python3 /work/main.py
echo "QVC-INIT: main.py exited $?"
poweroff -f
