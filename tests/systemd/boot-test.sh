#!/bin/bash
# Boots the distribution's systemd as PID 1 of private namespaces (pid, mount, uts, ipc,
# cgroup; the machine's network), over an overlay of / whose upper layer is a tmpfs, installs
# the Debian package there, and checks tfa-rotator as an operator runs it:
#   READY; a rotation into the sink, mode 0600, owned by the service's user; an unreadable
#   credential reported within seconds of start (STATUS=, journalctl -p err); systemctl
#   reload; a command by hand the documented way (tfa-rotator-run), then another rotation by
#   the service; a command as root refused without leaving files; exposure <= 1.5; a clean
#   stop.
#   With a second package (the same, rebuilt with a newer version): an upgrade under the
#   running service restarts it on the new binary, and it still rotates. Then the timer's
#   service, started once, rotates a due portal.
# Needs root. Usage: tests/systemd/boot-test.sh PACKAGE.deb [UPGRADE.deb]
# Facts it relies on: ../shared/design/systemd-in-ci.md. Everything it makes is undone by
# the trap: the container (poweroff, then SIGKILL), the simulator, the cgroup, the directory.
set -euo pipefail

deb=$(realpath "${1:?usage: boot-test.sh PACKAGE.deb [UPGRADE.deb]}")
upgrade=${2:+$(realpath "$2")}
here=$(cd "$(dirname "$0")/../.." && pwd)
[ "$(id -u)" = 0 ] || { echo "boot-test: needs root" >&2; exit 1; }
started=$(date +%s)

# The work directory is outside /tmp: the container gets a tmpfs /tmp of its own.
work=$(mktemp -d /var/tmp/tfa-systemd.XXXXXX)
if [ -d /sys/fs/cgroup/unified ] && [ "$(stat -fc %T /sys/fs/cgroup/unified)" = cgroup2fs ]; then
    cg2=/sys/fs/cgroup/unified
elif [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ]; then
    cg2=/sys/fs/cgroup
else
    echo "boot-test: no cgroup2 hierarchy" >&2
    exit 1
fi
cg=$cg2/tfa-boot-test.$$
pid1=
sim=

log() { printf '[boot-test %3ds] %s\n' "$(($(date +%s) - started))" "$*"; }
fail() {
    log "FAIL: $*"
    if [ -n "$pid1" ]; then
        ct journalctl --no-pager -n 80 2>/dev/null || true
    fi
    exit 1
}
ct() { nsenter -t "$pid1" -a -- "$@"; }
# Writes stdin to PATH inside the container (through its overlay, not around it).
put() { nsenter -t "$pid1" -a -- /bin/sh -c 'cat > "$1"' sh "$1"; }

cleanup() {
    set +e
    if [ -n "$pid1" ] && kill -0 "$pid1" 2>/dev/null; then
        nsenter -t "$pid1" -a -- systemctl poweroff >/dev/null 2>&1
        for _ in $(seq 50); do kill -0 "$pid1" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid1" 2>/dev/null
    fi
    [ -n "$sim" ] && kill "$sim" 2>/dev/null && wait "$sim" 2>/dev/null
    wait 2>/dev/null
    # The cgroups systemd made inside ours, depth first.
    if [ -d "$cg" ]; then
        find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null
        rmdir "$cg" 2>/dev/null
    fi
    mountpoint -q "$work/layer" && umount "$work/layer"
    rm -rf "$work"
}
trap cleanup EXIT

# --- The portal: the simulator on the machine's loopback, with two keys. -----------------
key() { printf 'sk-%s' "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"; }
acme_key=$(key)
beta_key=$(key)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$here/target/release/tfa-rotator" simulate --listen "127.0.0.1:$port" \
    --key "$acme_key" --key "$beta_key" > "$work/sim.log" 2>&1 &
sim=$!
for _ in $(seq 100); do grep -q "api_key" "$work/sim.log" && break; sleep 0.05; done
codes() { # the unused codes the portal accepts for a key, sorted
    python3 - "$port" "$1" <<'PY'
import json, sys, urllib.request
req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/api/2.0/settings/tfaappcodes",
                             headers={"Authorization": "Bearer " + sys.argv[2]})
doc = json.load(urllib.request.urlopen(req))
print("\n".join(sorted(c["code"] for c in doc["response"] if not c["isUsed"])))
PY
}

# --- The container's root: an overlay of / with a tmpfs upper layer. ---------------------
mkdir -p "$work/layer" "$work/root"
mount -t tmpfs -o mode=0755 tmpfs "$work/layer"
mkdir -p "$work/layer/upper" "$work/layer/work"
# The overlay is mounted inside the container's mount namespace (below), so nothing of it
# outlives PID 1; here only the upper layer's content is prepared.
up=$work/layer/upper
mkdir -p "$up/etc/systemd/system" "$up/etc/tfa-rotator/credentials"
cat > "$up/etc/systemd/system/tfa-test.target" <<'EOF'
[Unit]
Description=tfa-rotator boot test
Requires=basic.target systemd-journald.service
After=basic.target systemd-journald.service
AllowIsolate=yes
EOF
# What could act on the machine, or cannot work ct a container, is masked.
for u in systemd-udevd.service systemd-udevd-control.socket systemd-udevd-kernel.socket \
    systemd-udev-trigger.service systemd-udev-settle.service systemd-sysctl.service \
    systemd-modules-load.service kmod-static-nodes.service proc-sys-fs-binfmt_misc.automount \
    proc-sys-fs-binfmt_misc.mount systemd-binfmt.service systemd-timesyncd.service \
    systemd-networkd.service systemd-networkd.socket systemd-resolved.service getty.target \
    console-getty.service getty@tty1.service serial-getty@console.service \
    systemd-firstboot.service systemd-pstore.service systemd-repart.service \
    apt-daily.timer apt-daily-upgrade.timer fstrim.timer man-db.timer e2scrub_all.timer \
    e2scrub_reap.service dev-hugepages.mount dev-mqueue.mount sys-kernel-debug.mount \
    sys-kernel-tracing.mount sys-fs-fuse-connections.mount sys-kernel-config.mount \
    systemd-remount-fs.service systemd-hwdb-update.service systemd-journal-catalog-update.service \
    systemd-machine-id-commit.service ldconfig.service systemd-update-utmp.service \
    systemd-random-seed.service swap.target cryptsetup.target veritysetup.target \
    integritysetup.target remote-fs.target systemd-ask-password-console.path \
    systemd-ask-password-wall.path; do
    ln -sf /dev/null "$up/etc/systemd/system/$u"
done

# --- Boot: PID 1 of new namespaces. --------------------------------------------------------
mkdir -p "$cg"
cat > "$work/stage2.sh" <<EOF
#!/bin/bash
# PID 1 of the new pid namespace: into our cgroup, new mount/uts/ipc/cgroup namespaces,
# the overlay root, then exec systemd.
set -euo pipefail
echo 0 > "$cg/cgroup.procs"
exec unshare --mount --uts --ipc --cgroup --propagation private -- /bin/bash "$work/stage3.sh"
EOF
cat > "$work/stage3.sh" <<EOF
#!/bin/bash
set -euo pipefail
r="$work/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$work/layer/upper,workdir=$work/layer/work" "\$r"
mount -t proc proc "\$r/proc"
for p in sys sysrq-trigger irq bus fs; do
    [ -e "\$r/proc/\$p" ] && mount --bind -o ro "\$r/proc/\$p" "\$r/proc/\$p" || true
done
mount -t sysfs -o ro sysfs "\$r/sys"
mount -t cgroup2 cgroup2 "\$r/sys/fs/cgroup"
mount -t tmpfs -o mode=0755,nosuid tmpfs "\$r/dev"
for n in null zero full random urandom tty; do
    touch "\$r/dev/\$n"
    mount --bind "/dev/\$n" "\$r/dev/\$n"
done
mkdir -p "\$r/dev/pts" "\$r/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "\$r/dev/pts"
ln -sf pts/ptmx "\$r/dev/ptmx"
mount -t tmpfs -o mode=1777 tmpfs "\$r/dev/shm"
touch "\$r/dev/console"
mount --bind "\$(readlink -f /proc/self/fd/0 2>/dev/null || echo /dev/null)" "\$r/dev/console" 2>/dev/null \
    || mount --bind /dev/null "\$r/dev/console"
mount -t tmpfs -o mode=0755 tmpfs "\$r/run"
mount -t tmpfs -o mode=1777 tmpfs "\$r/tmp"
echo tfa-boot-test > "\$r/etc/hostname"
: > "\$r/etc/machine-id"
cd "\$r"
mkdir -p .oldroot
pivot_root . .oldroot
umount -l /.oldroot
rmdir /.oldroot
# Without a shared root, LoadCredential= hands over an empty directory.
mount --make-rshared /
exec env -i container=other PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    setpriv --bounding-set -sys_module,-sys_time,-net_admin,-syslog,-sys_boot,-sys_rawio,-mac_admin,-mac_override,-wake_alarm,-block_suspend,-audit_control \
    /lib/systemd/systemd --system --unit=tfa-test.target --show-status=no
EOF
chmod +x "$work/stage2.sh" "$work/stage3.sh"
# Install the package into the upper layer first, as dpkg on the machine would: through
# the container's own dpkg, before systemd starts (so the postinst runs without systemd, as
# on a machine being provisioned), by a throwaway mount namespace over the same layers.
unshare --mount --propagation private -- /bin/bash -c "
    set -e
    mount -t overlay overlay -o lowerdir=/,upperdir=$work/layer/upper,workdir=$work/layer/work $work/root
    mount --bind /proc $work/root/proc
    mount --bind /dev $work/root/dev
    cp '$deb' $work/root/tmp/tfa-rotator.deb 2>/dev/null || { mkdir -p $work/root/var/tmp; cp '$deb' $work/root/var/tmp/tfa-rotator.deb; }
    chroot $work/root /bin/sh -c 'dpkg -i /tmp/tfa-rotator.deb 2>/dev/null || dpkg -i /var/tmp/tfa-rotator.deb'
" > "$work/dpkg.log" 2>&1 || { cat "$work/dpkg.log"; fail "dpkg -i"; }
log "package installed: $(grep -o 'Setting up [^ ]*' "$work/dpkg.log" || true)"

unshare --pid --fork --kill-child -- /bin/bash "$work/stage2.sh" > "$work/console.log" 2>&1 &
outer=$!
# PID 1's pid on the machine: the child of the unshare process.
for _ in $(seq 100); do
    pid1=$(pgrep -P "$outer" -x systemd || true)
    [ -n "$pid1" ] && break
    kill -0 "$outer" 2>/dev/null || { cat "$work/console.log"; fail "the container did not start"; }
    sleep 0.1
done
[ -n "$pid1" ] || { cat "$work/console.log"; fail "no systemd as PID 1"; }
for _ in $(seq 300); do
    ct systemctl is-active -q tfa-test.target 2>/dev/null && break
    sleep 0.1
done
ct systemctl is-active -q tfa-test.target || { cat "$work/console.log"; fail "systemd did not reach tfa-test.target"; }
log "systemd $(ct systemctl --version | head -1 | awk '{print $2}') is PID 1 (machine pid $pid1)"

# --- Configure as an operator: the config, a credential, the drop-in. ----------------------
ct id tfa-rotator >/dev/null || fail "the package made no tfa-rotator user"
[ "$(ct stat -c '%U:%G %a' /etc/tfa-rotator)" = "root:tfa-rotator 750" ] \
    || fail "/etc/tfa-rotator is $(ct stat -c '%U:%G %a' /etc/tfa-rotator)"
# The packaged config as installed passes the trust rule (SPEC §3), as root and as the
# service's user (check --offline reports a violation as a warning, so its text is read),
# and is refused for its six placeholders alone (exit 78): as shipped it can
# never encrypt real codes to a key nobody holds.
for who in root tfa-rotator; do
    rc=0
    out=$(ct runuser -u "$who" -- tfa-rotator --config /etc/tfa-rotator/config.toml check --offline 2>&1) || rc=$?
    [ "$rc" = 78 ] || fail "check --offline of the packaged config as $who: exit $rc: $out"
    case "$out" in *"another user could change"*) fail "a trust violation as $who: $out" ;; esac
    [ "$(printf '%s\n' "$out" | grep -c '^error: /etc/tfa-rotator/config.toml:[0-9]*:[0-9]*: .*replace the example recipient')" = 6 ] \
        || fail "not the six placeholders as $who: $out"
    [ "$(printf '%s\n' "$out" | grep -c '^error: ')" = 7 ] || fail "other errors as $who: $out"
done
log "the packaged config passes the trust rule and is refused for its 6 placeholders alone, as root and as tfa-rotator"
put /etc/tfa-rotator/config.toml <<EOF
[sinks.codes]
type = "file"
path = "/var/lib/tfa-rotator/codes/{portal}.txt"

# A hook under the unit's sandbox (seccomp filter, ProtectProc=, ProtectSystem=strict):
# its guard must still become a subreaper and see the hook's processes.
[sinks.hook]
type = "exec"
command = ["/usr/bin/tee", "/var/lib/tfa-rotator/codes/{portal}.hook.txt"]

[schedules.yearly]
cron = "@yearly"

[portals.acme]
url = "http://127.0.0.1:$port"
api_key = { credential = "acme" }
schedule = "yearly"
sinks = ["codes", "hook"]

[portals.beta]
url = "http://127.0.0.1:$port"
api_key = { credential = "beta" }
schedule = "yearly"
sinks = ["codes"]
EOF
ct chown root:tfa-rotator /etc/tfa-rotator/config.toml
ct chmod 0640 /etc/tfa-rotator/config.toml
printf '%s\n' "$acme_key" | put /etc/tfa-rotator/credentials/acme
ct chmod 0600 /etc/tfa-rotator/credentials/acme
# beta's credential is loaded from a file, but an empty one: the service cannot use it.
: | put /etc/tfa-rotator/credentials/beta
ct mkdir -p /etc/systemd/system/tfa-rotator.service.d
put /etc/systemd/system/tfa-rotator.service.d/credentials.conf <<'EOF'
[Service]
LoadCredential=acme:/etc/tfa-rotator/credentials/acme
LoadCredential=beta:/etc/tfa-rotator/credentials/beta
EOF
ct systemctl daemon-reload

# --- Start: READY, the unreadable credential reported at once, the first rotation. --------
t0=$(date +%s%N)
ct systemctl start tfa-rotator || fail "systemctl start"
ready_ms=$((($(date +%s%N) - t0) / 1000000))
[ "$(ct systemctl show -P ActiveState tfa-rotator)" = active ] || fail "not active"
status=$(ct systemctl show -P StatusText tfa-rotator)
log "active (running) after ${ready_ms} ms; STATUS=$status"
case "$status" in *"cannot read their secrets: beta"*) ;; *) fail "STATUS= does not name beta: $status" ;; esac
ct journalctl -u tfa-rotator -p err --no-pager | grep -q "a secret cannot be read" \
    || fail "journalctl -p err shows no error for beta"
log "journalctl -p err: $(ct journalctl -u tfa-rotator -p err --no-pager -o cat | grep -m1 'secret cannot be read')"

# systemd applied ConfigurationDirectory=: still root's, the service's group, closed to others.
[ "$(ct stat -c '%U:%G %a' /etc/tfa-rotator)" = "root:tfa-rotator 750" ] \
    || fail "after start /etc/tfa-rotator is $(ct stat -c '%U:%G %a' /etc/tfa-rotator)"
sink=/var/lib/tfa-rotator/codes/acme.txt
for _ in $(seq 100); do ct test -s "$sink" && break; sleep 0.1; done
ct test -s "$sink" || fail "no rotation into $sink"
[ "$(ct stat -c '%U %a' "$sink")" = "tfa-rotator 600" ] || fail "$sink is $(ct stat -c '%U %a' "$sink")"
ct grep -v '^#' "$sink" | sort > "$work/got"
codes "$acme_key" > "$work/want"
cmp -s "$work/got" "$work/want" || fail "the sink does not hold the set the portal accepts"
ct grep -v '^#' /var/lib/tfa-rotator/codes/acme.hook.txt | sort | cmp -s - "$work/want" \
    || fail "the exec sink's hook did not get the set: $(ct journalctl -u tfa-rotator --no-pager -o cat | grep -i hook | tail -3)"
log "rotated into $sink (tfa-rotator, 0600) and through the exec hook: the set the portal accepts"

# --- Reload. -------------------------------------------------------------------------------
ct systemctl reload tfa-rotator || fail "systemctl reload"
[ "$(ct systemctl show -P ActiveState tfa-rotator)" = active ] || fail "not active after reload"
ct journalctl -u tfa-rotator --no-pager -o cat | grep -q "configuration reloaded" || fail "no reload ct the journal"
log "reloaded"

# --- By hand: as root directly, refused without leaving a file; the documented way works. -
out=$(ct /usr/bin/tfa-rotator rotate acme 2>&1) && fail "rotate as root was not refused"
case "$out" in *tfa-rotator-run*) ;; *) fail "the refusal does not name tfa-rotator-run: $out" ;; esac
[ -z "$(ct find /var/lib/tfa-rotator -user root)" ] || fail "root left files ct the state"
before=$(cat "$work/want")
ct tfa-rotator-run rotate acme > "$work/byhand.log" 2>&1 || { cat "$work/byhand.log"; fail "tfa-rotator-run rotate acme"; }
codes "$acme_key" > "$work/want"
[ "$before" != "$(cat "$work/want")" ] || fail "the rotation by hand issued no new set"
ct grep -v '^#' "$sink" | sort | cmp -s - "$work/want" || fail "after the rotation by hand the sink is stale"
[ -z "$(ct find /var/lib/tfa-rotator ! -user tfa-rotator)" ] || fail "a file not the service's: $(ct find /var/lib/tfa-rotator ! -user tfa-rotator)"
log "by hand: root refused ($(echo "$out" | grep -o 'tfa-rotator-run ARGS' | head -1)), tfa-rotator-run rotated"

# A command by hand runs in the service's sandbox: every property tfa-rotator-run copies has
# the service's value in the transient unit it starts (a dry-run daemon, to look at it).
ct env TFA_ROTATOR_RUN_UNIT=tfa-rotator-by-hand tfa-rotator-run run --dry-run > "$work/byhand-run.log" 2>&1 &
byhand=$!
for _ in $(seq 100); do
    [ "$(ct systemctl show -P ActiveState tfa-rotator-by-hand 2>/dev/null)" = active ] && break
    sleep 0.1
done
[ "$(ct systemctl show -P ActiveState tfa-rotator-by-hand)" = active ] || { cat "$work/byhand-run.log"; fail "tfa-rotator-run run --dry-run did not start"; }
mismatch=""
compared=0
for p in $(ct tfa-rotator-run --print-properties); do
    a=$(ct systemctl show -p "$p" --value tfa-rotator)
    b=$(ct systemctl show -p "$p" --value tfa-rotator-by-hand)
    # The one addition: who ran it (for the record of a decision taken by hand).
    [ "$p" = Environment ] && b=$(printf '%s' "$b" | sed -E 's/ ?TFA_ROTATOR_INVOKED_BY=[^ ]*//; s/^ //')
    [ "$a" = "$b" ] || mismatch="$mismatch
  $p: service [$a], by hand [$b]"
    compared=$((compared + 1))
done
ct systemctl stop tfa-rotator-by-hand
wait "$byhand" || true
[ -z "$mismatch" ] || fail "the command by hand runs outside the service's sandbox:$mismatch"
log "by hand: the transient unit has the service's value for all $compared properties tfa-rotator-run copies"

# The service rotates again after it: a changed entry (a second sink) rotates acme.
{
    ct cat /etc/tfa-rotator/config.toml | sed 's/^sinks = \["codes", "hook"\]$/sinks = ["codes", "hook", "copy"]/'
    printf '\n[sinks.copy]\ntype = "file"\npath = "/var/lib/tfa-rotator/codes/{portal}.copy.txt"\n'
} > "$work/config.new"
put /etc/tfa-rotator/config.toml < "$work/config.new"
ct systemctl reload tfa-rotator
for _ in $(seq 100); do ct test -s /var/lib/tfa-rotator/codes/acme.copy.txt && break; sleep 0.1; done
ct test -s /var/lib/tfa-rotator/codes/acme.copy.txt || fail "the service did not rotate after the command by hand"
codes "$acme_key" > "$work/want"
ct grep -v '^#' "$sink" | sort | cmp -s - "$work/want" || fail "the service's rotation did not reach the sink"
ct journalctl -u tfa-rotator --no-pager -o cat | grep -q "Permission denied" && fail "the service hit Permission denied"
log "the service rotated again after the command by hand"

# acme's entry changes (another sink): a portal due now, for the checks below.
another_sink() { # another_sink NAME: adds a file sink NAME to acme's sinks
    { ct cat /etc/tfa-rotator/config.toml | sed "s/^sinks = \\[\"codes\", \"hook\"/sinks = [\"codes\", \"hook\", \"$1\"/"
      printf '\n[sinks.%s]\ntype = "file"\npath = "/var/lib/tfa-rotator/codes/{portal}.%s.txt"\n' "$1" "$1"
    } > "$work/config.new"
    put /etc/tfa-rotator/config.toml < "$work/config.new"
}

# --- An upgrade restarts the running service on the new binary, which still rotates. -------
if [ -n "$upgrade" ]; then
    # An image built for Docker forbids maintainer scripts to start or restart anything
    # (policy-rc.d exits 101); a Debian host has none. Removed in the overlay only.
    ct rm -f /usr/sbin/policy-rc.d
    pid_before=$(ct systemctl show -P MainPID tfa-rotator)
    put /var/tmp/upgrade.deb < "$upgrade"
    ct dpkg -i /var/tmp/upgrade.deb > "$work/upgrade.log" 2>&1 || { cat "$work/upgrade.log"; fail "dpkg -i of the upgrade"; }
    pid_after=$(ct systemctl show -P MainPID tfa-rotator)
    [ "$(ct systemctl show -P ActiveState tfa-rotator)" = active ] || fail "not active after the upgrade"
    { [ "$pid_after" != "$pid_before" ] && [ "$pid_after" != 0 ]; } \
        || fail "the upgrade did not restart the service (MainPID $pid_before, then $pid_after)"
    another_sink upgraded
    ct systemctl reload tfa-rotator
    for _ in $(seq 100); do ct test -s /var/lib/tfa-rotator/codes/acme.upgraded.txt && break; sleep 0.1; done
    ct test -s /var/lib/tfa-rotator/codes/acme.upgraded.txt || fail "the upgraded service did not rotate"
    codes "$acme_key" > "$work/want"
    ct grep -v '^#' /var/lib/tfa-rotator/codes/acme.upgraded.txt | sort | cmp -s - "$work/want" \
        || fail "after the upgrade the sink does not hold the set the portal accepts"
    log "upgraded to $(ct dpkg-query -W -f '${Version}' tfa-rotator): MainPID $pid_before -> $pid_after, and it rotated"
fi

# --- Hardening, as systemd rates the running unit. -------------------------------------------
exposure=$(ct systemd-analyze security tfa-rotator --no-pager 2>/dev/null | sed -n 's/.*Overall exposure level for tfa-rotator.service: \([0-9.]*\).*/\1/p')
[ -n "$exposure" ] || fail "no exposure level"
awk -v e="$exposure" 'BEGIN { exit !(e <= 1.5) }' || fail "exposure $exposure > 1.5"
log "exposure $exposure"

# --- A clean stop. --------------------------------------------------------------------------
ct systemctl stop tfa-rotator
[ "$(ct systemctl show -P Result tfa-rotator)" = success ] || fail "stop: $(ct systemctl show -P Result tfa-rotator)"
[ "$(ct systemctl show -P ExecMainStatus tfa-rotator)" = 0 ] || fail "exit status $(ct systemctl show -P ExecMainStatus tfa-rotator)"
log "stopped cleanly"

# --- The timer's service, started once, rotates a due portal (the daemon stopped). ----------
ct systemctl is-enabled -q tfa-rotator-once.timer 2>/dev/null && fail "the package enabled the timer"
ct mkdir -p /etc/systemd/system/tfa-rotator-once.service.d
ct cp /etc/systemd/system/tfa-rotator.service.d/credentials.conf /etc/systemd/system/tfa-rotator-once.service.d/
ct systemctl daemon-reload
another_sink once
ct systemctl start tfa-rotator-once.service || fail "tfa-rotator-once.service: $(ct journalctl -u tfa-rotator-once --no-pager -o cat | tail -5)"
[ "$(ct systemctl show -P Result tfa-rotator-once)" = success ] || fail "tfa-rotator-once.service: $(ct systemctl show -P Result tfa-rotator-once)"
ct test -s /var/lib/tfa-rotator/codes/acme.once.txt || fail "the timer's service did not rotate the due portal"
codes "$acme_key" > "$work/want"
ct grep -v '^#' /var/lib/tfa-rotator/codes/acme.once.txt | sort | cmp -s - "$work/want" \
    || fail "the timer's rotation does not hold the set the portal accepts"
log "the timer's service (run --once) rotated the due portal; $(ct systemctl show -P NextElapseUSecRealtime tfa-rotator-once.timer >/dev/null 2>&1 && echo 'the timer is installed, not enabled')"
log "PASS in $(($(date +%s) - started)) s"
