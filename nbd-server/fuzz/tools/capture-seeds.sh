#!/bin/sh
# Capture the client side of real NBD sessions (nbdinfo, nbdcopy, qemu-img,
# qemu-io) against a 1 MiB writable nbdkit memory disk -- the same size as
# the fuzz target's device -- into corpus/handshake_and_requests/.
# Usage: tools/capture-seeds.sh   (from nbd-server/fuzz)
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
out="$here/corpus/handshake_and_requests"
tmp=$(mktemp -d)
mkdir -p "$out"
nbdkit_pid=""
proxy_pid=""
cleanup() {
    [ -n "$proxy_pid" ] && kill "$proxy_pid" 2>/dev/null && wait "$proxy_pid" 2>/dev/null
    [ -n "$nbdkit_pid" ] && kill "$nbdkit_pid" 2>/dev/null && wait "$nbdkit_pid" 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT INT TERM

nbdkit -f -U "$tmp/up.sock" memory 1M &
nbdkit_pid=$!
head -c 1048576 /dev/urandom > "$tmp/data.img"
# A half-sparse image, so qemu-img convert sends WRITE_ZEROES too.
truncate -s 1M "$tmp/sparse.img"
dd if=/dev/urandom of="$tmp/sparse.img" bs=64k count=4 seek=4 conv=notrunc 2>/dev/null

capture() { # name command...
    name=$1; shift
    python3 "$here/tools/capture.py" "$tmp/p.sock" "$tmp/up.sock" "$tmp/$name" &
    proxy_pid=$!
    while [ ! -S "$tmp/p.sock" ]; do sleep 0.05; done
    timeout 30 "$@" >/dev/null 2>&1 || echo "capture $name: client exited $?" >&2
    sleep 0.3
    kill "$proxy_pid"; wait "$proxy_pid" 2>/dev/null || true
    proxy_pid=""
    rm -f "$tmp/p.sock"
    for f in "$tmp/$name"-*.bin; do
        [ -s "$f" ] && cp "$f" "$out/$(basename "$f" .bin)"
    done
}

U="nbd+unix:///?socket=$tmp/p.sock"
capture nbdinfo nbdinfo "$U"
capture nbdinfo-list nbdinfo --list "$U"
capture nbdinfo-map nbdinfo --map "$U"
capture nbdinfo-map-totals nbdinfo --map --totals "$U"
capture nbdcopy-write nbdcopy --connections=1 "$tmp/data.img" "$U"
capture nbdcopy-read nbdcopy --connections=1 "$U" null:
capture qemu-img-info qemu-img info -f raw "$U"
capture qemu-img-map qemu-img map -f raw --output=json "$U"
capture qemu-img-convert qemu-img convert -n -f raw -O raw "$tmp/sparse.img" "$U"
capture qemu-io qemu-io -f raw "$U" \
    -c 'write -P 0xab 0 64k' -c 'read -P 0xab 0 64k' -c 'write -z 64k 64k' \
    -c 'discard 128k 64k' -c 'flush' -c 'write -F 4096 4k' -c 'read 1020k 4k'
capture qemu-io-aio qemu-io -f raw "$U" \
    -c 'aio_write -P 1 0 4k' -c 'aio_write -P 2 8k 4k' -c 'aio_read 0 4k' -c 'aio_flush'
ls -l "$out"
