#!/bin/bash
# The README's two commands on a fresh Debian 12: a `debootstrap --variant=minbase bookworm`
# root (kept under target/fresh-root, so a second run starts at once), the host's Rust
# toolchain bind-mounted read-only, a fresh clone of this repository inside, and the two
# commands run there exactly as the README's first code block writes them. Run it by hand,
# as root (CI need not: it downloads a Debian root and builds everything twice).
#   tests/fresh-debian.sh            # prints each command's wall time and the test counts
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" = 0 ] || { echo "fresh-debian: needs root" >&2; exit 1; }
root=$here/target/fresh-root
command -v debootstrap >/dev/null || { apt-get update -qq; apt-get install -y -qq debootstrap; }
if [ ! -x "$root/usr/bin/apt-get" ]; then
    mkdir -p "$root"
    debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian
    # The toolchain's linker prerequisites (what rustup's own installer asks for) and git
    # for the clone; nothing the README's test command installs itself.
    chroot "$root" apt-get install -y -qq --no-install-recommends gcc libc6-dev ca-certificates git
fi

# A network that reaches the registries through an intercepting proxy has a CA of its own
# in the host's store: the fresh root trusts it too (a machine without one skips this).
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >/dev/null
fi

mounts=()
bind() { # bind SRC DST [ro]
    mkdir -p "$root$2"
    mount --bind "$1" "$root$2"
    [ "${3:-}" = ro ] && mount -o remount,bind,ro "$root$2"
    mounts=("$root$2" "${mounts[@]}")
}
cleanup() {
    set +e
    # Whatever the suite left running inside (it should leave nothing) goes first.
    for p in /proc/[0-9]*; do
        [ "$(readlink "$p/root" 2>/dev/null)" = "$root" ] && kill -9 "${p#/proc/}" 2>/dev/null
    done
    for m in "${mounts[@]}"; do umount -l "$m" 2>/dev/null; done
}
trap cleanup EXIT
bind /proc /proc
bind /sys /sys
bind /dev /dev
bind /dev/pts /dev/pts
bind /dev/shm /dev/shm
bind "$HOME/.rustup" /opt/rustup ro
bind "$HOME/.cargo/bin" /opt/cargo-bin ro

# A fresh clone of what is committed, and the README's first code block, literally.
rm -rf "$root/root/tfa-rotator"
git clone -q "$here" "$root/root/tfa-rotator"
commands=$(awk '/^```sh$/ { n++; next } /^```$/ { if (n == 1) exit } n == 1' "$here/README.md")
echo "the README's commands:"
printf '  %s\n' "$commands"

status=0
while IFS= read -r line; do
    cmd=${line%%#*}
    started=$(date +%s)
    echo "== $cmd"
    chroot "$root" /usr/bin/env -i HOME=/root PATH=/opt/cargo-bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        RUSTUP_HOME=/opt/rustup CARGO_HOME=/root/.cargo TERM=dumb \
        /bin/bash -c "cd /root/tfa-rotator && $cmd" > "$here/target/fresh-$started.log" 2>&1 || status=$?
    took=$(($(date +%s) - started))
    counts=$(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
                  END { if (p + f) printf "%d passed, %d failed", p, f }' "$here/target/fresh-$started.log")
    echo "   exit $status after ${took} s ${counts:+($counts)}; log: target/fresh-$started.log"
    [ "$status" = 0 ] || break
done <<< "$commands"
exit "$status"
