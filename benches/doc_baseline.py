"""The loop DocSpace's documentation shows for backup codes: for each account, GET the codes,
then PUT new ones, sequentially, with `requests`. Prints accounts per second."""
import sys, time
import requests

base, keys_file = sys.argv[1], sys.argv[2]
keys = [k.strip() for k in open(keys_file) if k.strip()]
t = time.perf_counter()
for key in keys:
    headers = {"Authorization": f"Bearer {key}", "Accept": "application/json"}
    r = requests.get(f"{base}api/2.0/settings/tfaappcodes", headers=headers)
    r.raise_for_status()
    r = requests.put(f"{base}api/2.0/settings/tfaappnewcodes", headers=headers)
    r.raise_for_status()
print(len(keys) / (time.perf_counter() - t))
