#!/bin/sh
# Makes the TEST-ONLY OpenPGP keys in this directory. They were made once and are checked
# in, so the tests generate nothing; run this again only to replace them. Every secret key
# here is public knowledge: never use one for anything but these tests.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
home=$(mktemp -d /tmp/tfa-make-keys.XXXXXX)
trap 'gpgconf --homedir "$home" --kill all; rm -rf "$home"' EXIT
g() { gpg --homedir "$home" --batch --yes --pinentry-mode loopback --passphrase '' "$@"; }
fpr() { g --with-colons --list-keys "$1" | awk -F: '/^fpr:/ {print $10; exit}'; }

g --quick-generate-key 'Ed Owner <ed@rotator.test>' future-default default never
g --quick-generate-key 'Rsa Owner <rsa@rotator.test>' rsa3072 sign never
g --quick-add-key "$(fpr rsa@rotator.test)" rsa3072 encr never
g --faked-system-time 20200101T000000 --quick-generate-key 'Old Owner <old@rotator.test>' ed25519 default 1d
g --quick-generate-key 'Gone Owner <gone@rotator.test>' future-default default never
gone=$(fpr gone@rotator.test)
sed 's/^:-----BEGIN/-----BEGIN/' "$home/openpgp-revocs.d/$gone.rev" > "$home/rev.asc"
g --import "$home/rev.asc"
g --quick-generate-key 'Sign Owner <sign@rotator.test>' ed25519 sign never
g --quick-generate-key 'Weak <weak@rotator.test>' rsa1024 default never
g --quick-generate-key 'Dsa <dsa@rotator.test>' dsa2048 default never
g --quick-add-key "$(fpr dsa@rotator.test)" elg2048 encr never
g --quick-generate-key 'Ann <ann@rotator.test>' ed25519 default never
g --quick-add-key "$(fpr ann@rotator.test)" cv25519 encr never
g --quick-add-uid "$(fpr ann@rotator.test)" 'Ann Old <old@rotator.test>'
g --quick-revoke-uid "$(fpr ann@rotator.test)" 'Ann Old <old@rotator.test>'

: > "$here/fingerprints"
for pair in ed:ed@rotator.test rsa:rsa@rotator.test expired:old@rotator.test \
    revoked:gone@rotator.test sign-only:sign@rotator.test weak:weak@rotator.test \
    dsa:dsa@rotator.test ann:ann@rotator.test; do
    name=${pair%%:*} uid=${pair#*:}
    f=$(g --with-colons --list-keys "<$uid>" | awk -F: '/^fpr:/ {print $10; exit}')
    g --armor --export "$f" > "$here/$name.asc"
    echo "$name $f" >> "$here/fingerprints"
done
# The two keys tests decrypt with. TEST ONLY.
for name in ed rsa; do
    f=$(awk -v n=$name '$1 == n {print $2}' "$here/fingerprints")
    g --armor --export-secret-keys "$f" > "$here/$name.secret.asc"
done
