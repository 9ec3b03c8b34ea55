"""The loop DocSpace's documentation shows for backup codes: for each account, GET the codes,
then PUT new ones, sequentially, with `requests`. Prints accounts per second.

Usage: doc_baseline.py BASE_URL KEYS_FILE (one key a line), or doc_baseline.py - FILE with
lines "BASE_URL KEY" for accounts on several portals."""
import sys, time
import requests

base, keys_file = sys.argv[1], sys.argv[2]
pairs = []
for line in open(keys_file):
    parts = line.split()
    if not parts:
        continue
    pairs.append((parts[0], parts[1]) if base == "-" else (base, parts[0]))
t = time.perf_counter()
for base, key in pairs:
    headers = {"Authorization": f"Bearer {key}", "Accept": "application/json"}
    r = requests.get(f"{base}api/2.0/settings/tfaappcodes", headers=headers)
    r.raise_for_status()
    r = requests.put(f"{base}api/2.0/settings/tfaappnewcodes", headers=headers)
    r.raise_for_status()
print(len(pairs) / (time.perf_counter() - t))
