#!/usr/bin/env python3
"""Docker HEALTHCHECK: GET http://127.0.0.1:8008/health (every process of this image,
main or worker, has an http listener on 8008). Override with SYNAPSE_HEALTHCHECK_URL."""
import os
import sys
import urllib.request

url = os.environ.get("SYNAPSE_HEALTHCHECK_URL") or "http://127.0.0.1:8008/health"
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
try:
    with opener.open(url, timeout=4) as resp:
        ok = resp.status == 200
except Exception as e:  # noqa: BLE001 - any failure is "unhealthy"
    print("unhealthy: %s: %s" % (url, e))
    sys.exit(1)
sys.exit(0 if ok else 1)
