#!/bin/bash
# Build the minimal guest the VM tests boot under qemu TCG, and cache it outside the repo.
#
# Why these pieces: Debian's own kernel (no kernel build on CI), booted as an uncompressed
# vmlinux through qboot (skips SeaBIOS and the in-guest decompression, which are slow under
# TCG); a busybox-static initramfs that loads only the virtio/9p modules it needs; a
# debootstrap root with python3 + python3-qpid-proton (0.37) shared read-only over 9p.
#
# Output, in ${QVC_CACHE:-$HOME/.cache/qpid-virtio-connector}/vm:
#   vmlinux        uncompressed kernel (ELF, PVH entry)
#   initrd.cpio.gz busybox + modules + /init
#   root/          the guest's root filesystem (read-only 9p share, tag "root")
#   STAMP          written last; its presence means the assets are complete
# Each piece is rebuilt only when missing. Needs root (debootstrap), apt, busybox-static, xz.
set -euo pipefail

CACHE="${QVC_CACHE:-$HOME/.cache/qpid-virtio-connector}/vm"
SUITE="${QVC_GUEST_SUITE:-bookworm}"
MIRROR="${QVC_GUEST_MIRROR:-http://deb.debian.org/debian}"
HERE="$(cd "$(dirname "$0")" && pwd)"
# Bump when the recipe changes so cached assets from an older recipe are rebuilt.
RECIPE=3

mkdir -p "$CACHE"
if [[ -f "$CACHE/STAMP" && "$(cat "$CACHE/STAMP")" == "$RECIPE" ]]; then
    echo "guest assets up to date in $CACHE"
    exit 0
fi
rm -f "$CACHE/STAMP"

need() { command -v "$1" >/dev/null || { echo "build_guest: missing $1 ($2)" >&2; exit 1; }; }
need debootstrap "apt-get install debootstrap"
need busybox "apt-get install busybox-static"
need xz "apt-get install xz-utils"
need cpio "apt-get install cpio"
need apt-get "Debian host"

# --- kernel + modules -------------------------------------------------------------------
if [[ ! -f "$CACHE/vmlinux" || ! -d "$CACHE/kernel" ]]; then
    # The version the linux-image-amd64 metapackage points at is the one apt offers now.
    kernel_pkg() {
        apt-cache depends linux-image-amd64 2>/dev/null \
            | sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -n1
    }
    pkg="$(kernel_pkg)"
    if [[ -z "$pkg" ]]; then  # a fresh machine may have no package lists yet
        apt-get update -q >/dev/null
        pkg="$(kernel_pkg)"
    fi
    [[ -n "$pkg" ]] || { echo "build_guest: apt offers no linux-image-amd64" >&2; exit 1; }
    work="$(mktemp -d)"
    (cd "$work" && apt-get download "$pkg" >/dev/null)
    rm -rf "$CACHE/kernel"
    dpkg -x "$work"/*.deb "$CACHE/kernel"
    rm -rf "$work"
    bz="$(ls "$CACHE"/kernel/boot/vmlinuz-*)"
    # bzImage = setup code + compressed payload; find the xz stream's magic and unpack it.
    off="$(grep -abo $'\xfd7zXZ\x00' "$bz" | head -n1 | cut -d: -f1)"
    # xz stops at the stream end and complains about the trailing bytes; the ELF is complete.
    tail -c +"$((off + 1))" "$bz" | xz -dc 2>/dev/null > "$CACHE/vmlinux.tmp" || true
    head -c 4 "$CACHE/vmlinux.tmp" | grep -q $'\x7fELF' || { echo "build_guest: no ELF in $bz" >&2; exit 1; }
    mv "$CACHE/vmlinux.tmp" "$CACHE/vmlinux"
fi

# --- initramfs ----------------------------------------------------------------------------
kver="$(ls "$CACHE/kernel/lib/modules")"
moddir="$CACHE/kernel/lib/modules/$kver"
# Modules the guest needs; each one's dependencies come from its .modinfo section.
WANTED="virtio_pci virtio_console 9pnet_virtio 9p"
resolve() {  # print the module paths for $1 and its deps, deps first (no depmod needed)
    local name="$1" path deps d
    path="$(find "$moddir/kernel" -name "${name}.ko" -o -name "${name}.ko.xz" | head -n1)"
    [[ -n "$path" ]] || return 0  # built into the kernel
    # The .modinfo section holds "depends=a,b" as a NUL-terminated string.
    deps="$(xz -dcf "$path" | tr '\0' '\n' | sed -n 's/^depends=//p' | tr ',' ' ')"
    for d in $deps; do
        resolve "$d"
    done
    echo "$path"
}
initrd="$(mktemp -d)"
mkdir -p "$initrd"/{bin,sbin,proc,sys,dev,root,modules,etc}
cp "$(command -v busybox)" "$initrd/bin/busybox"
for applet in sh mount umount insmod mkdir chroot poweroff sleep cat echo ip ln mknod; do
    ln -s busybox "$initrd/bin/$applet"
done
: > "$initrd/modules/order"
for m in $WANTED; do
    for rel in $(resolve "$m"); do
        base="$(basename "$rel" | sed 's/\.xz$//')"
        grep -qx "$base" "$initrd/modules/order" && continue
        xz -dcf "$rel" > "$initrd/modules/$base"
        echo "$base" >> "$initrd/modules/order"
    done
done
cp "$HERE/guest_init.sh" "$initrd/init"
chmod +x "$initrd/init"
(cd "$initrd" && find . | cpio -o -H newc --quiet | gzip -1) > "$CACHE/initrd.cpio.gz"
rm -rf "$initrd"

# --- root filesystem ----------------------------------------------------------------------
if [[ ! -x "$CACHE/root/usr/bin/python3" ]]; then
    rm -rf "$CACHE/root.tmp"
    debootstrap --variant=minbase --include=python3,python3-qpid-proton \
        "$SUITE" "$CACHE/root.tmp" "$MIRROR"
    # Mount points the guest init binds into; the root itself stays read-only.
    mkdir -p "$CACHE/root.tmp/qvc" "$CACHE/root.tmp/work"
    rm -rf "$CACHE/root.tmp/var/cache/apt/archives"/*.deb
    mv "$CACHE/root.tmp" "$CACHE/root"
fi

echo "$RECIPE" > "$CACHE/STAMP"
echo "guest assets built in $CACHE (kernel $kver)"
