"""Make sure a Redis answers at 127.0.0.1:6379 (or $SHUFFLE_R1_REDIS_URL); start one if not.

Called by `make test`. A Redis started here is a daemon that outlives this script and keeps
nothing on disk.
"""

import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from services.embedded_redis import ping, redis_server_binary

url = os.environ.get("SHUFFLE_R1_REDIS_URL", "redis://127.0.0.1:6379/0")
if ping(url):
    print(f"redis: {url} answers")
    sys.exit(0)
port = url.rsplit(":", 1)[-1].split("/")[0]
subprocess.run(
    [redis_server_binary(), "--port", port, "--bind", "127.0.0.1", "--daemonize", "yes",
     "--save", "", "--appendonly", "no", "--dir", "/tmp"],
    check=True,
)  # fmt: skip
for _ in range(100):
    if ping(url):
        print(f"redis: started one at {url}")
        sys.exit(0)
    time.sleep(0.1)
sys.exit(f"redis: could not start a server for {url}")
