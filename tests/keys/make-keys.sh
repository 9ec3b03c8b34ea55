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

g --quick-generate-key 'Ed Owner <ed@example.com>' future-default default never
g --quick-generate-key 'Rsa Owner <rsa@example.com>' rsa3072 sign never
g --quick-add-key "$(fpr rsa@example.com)" rsa3072 encr never
g --faked-system-time 20200101T000000 --quick-generate-key 'Old Owner <old@example.com>' ed25519 default 1d
g --quick-generate-key 'Gone Owner <gone@example.com>' future-default default never
gone=$(fpr gone@example.com)
sed 's/^:-----BEGIN/-----BEGIN/' "$home/openpgp-revocs.d/$gone.rev" > "$home/rev.asc"
g --import "$home/rev.asc"
g --quick-generate-key 'Sign Owner <sign@example.com>' ed25519 sign never
g --quick-generate-key 'Weak <weak@example.com>' rsa1024 default never
g --quick-generate-key 'Dsa <dsa@example.com>' dsa2048 default never
g --quick-add-key "$(fpr dsa@example.com)" elg2048 encr never
g --quick-generate-key 'Ann <ann@example.com>' ed25519 default never
g --quick-add-key "$(fpr ann@example.com)" cv25519 encr never
g --quick-add-uid "$(fpr ann@example.com)" 'Ann Old <old@example.com>'
g --quick-revoke-uid "$(fpr ann@example.com)" 'Ann Old <old@example.com>'

: > "$here/fingerprints"
for pair in ed:ed@example.com rsa:rsa@example.com expired:old@example.com \
    revoked:gone@example.com sign-only:sign@example.com weak:weak@example.com \
    dsa:dsa@example.com ann:ann@example.com; do
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
