#!/bin/sh
# Make a local stand-in for the python:3.11-slim base image on a machine that
# reaches Debian's package mirror but no container registry: a minimal Debian
# bookworm (its python3 is 3.11) with pip and venv, `python` and `pip` on PATH,
# pip allowed to install system-wide (no EXTERNALLY-MANAGED marker, as in the
# official image), and this host's CA bundle so pip verifies the package index
# exactly as the host does. Needs root, debootstrap and a running Docker engine.
#
#   sudo deploy/make-base-image.sh            # tags python:3.11-slim
#   sudo deploy/make-base-image.sh TAG        # or another tag
#
# DEBIAN_MIRROR overrides the mirror (default: Debian's public one).
set -eu

tag=${1:-python:3.11-slim}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ca_bundle=/etc/ssl/certs/ca-certificates.crt

for tool in debootstrap docker; do
    command -v "$tool" >/dev/null || { echo "make-base-image: $tool is not installed" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "make-base-image: debootstrap needs root" >&2; exit 1; }
[ -r "$ca_bundle" ] || { echo "make-base-image: no CA bundle at $ca_bundle" >&2; exit 1; }
docker info >/dev/null 2>&1 || { echo "make-base-image: no Docker engine answers (docker info failed)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rootfs=$work/rootfs

debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
    bookworm "$rootfs" "$mirror"

ln -sf python3 "$rootfs/usr/bin/python"
ln -sf pip3 "$rootfs/usr/bin/pip"
rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
# Debian's pip verifies against the system bundle: make it the host's, which
# holds whatever authority the host's own pip trusts for the package index.
cp "$ca_bundle" "$rootfs/etc/ssl/certs/ca-certificates.crt"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*

tar -C "$rootfs" -c . | docker import \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'ENV LANG=C.UTF-8' \
    -c 'CMD ["python3"]' \
    - "$tag"
docker run --rm "$tag" sh -c 'python --version && pip --version'
echo "make-base-image: tagged $tag"
