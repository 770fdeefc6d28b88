"""The load generator's own ceiling on this machine: locust against a bare aiohttp handler.

    .venv/bin/python loadtest/ceiling.py --seconds 15        # one process, then 2 workers

The rehearsal's figures (RESULTS.md) are the gateway's and locust's together. This measures
locust alone: the scenario's client setup (FastHttpUser, one shared pool of 64 connections)
POSTing as fast as it can to benchmarks/bare.py, which answers every request at once. Whatever
a rehearsal moves per second is at most this; a rehearsal near it was bounded by its
generator, not by seckill. Prints one JSON line per setup.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from seckill.embedded import free_port  # noqa: E402

LOCUSTFILE = """
from geventhttpclient.client import HTTPClientPool
from locust import FastHttpUser, constant, task


class Tapper(FastHttpUser):
    client_pool = HTTPClientPool(concurrency=64)
    wait_time = constant(0)

    @task
    def buy(self):
        self.client.post("/api/v1/activities/a/orders", data=b'{"quantity": 1}',
                         headers={"Idempotency-Key": "k", "Content-Type": "application/json"})
"""


def _wait(url: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def run(seconds: int, workers: int, users: int, work: Path, base: str) -> dict[str, object]:
    locustfile = work / "ceiling_locustfile.py"
    locustfile.write_text(LOCUSTFILE)
    locust = str(Path(sys.executable).parent / "locust")
    prefix = work / f"ceiling-{workers}"
    common = ["-f", str(locustfile), "--headless", "--host", base, "--only-summary"]
    master = [locust, *common, "-u", str(users), "-r", str(users), "-t", f"{seconds}s",
              "--csv", str(prefix)]  # fmt: skip
    children = []
    if workers:
        master += ["--master", "--expect-workers", str(workers)]
        children = [
            subprocess.Popen(
                [locust, "-f", str(locustfile), "--worker"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(workers)
        ]
    subprocess.run(master, capture_output=True, timeout=seconds + 120, check=False)
    for child in children:
        child.wait(30)
    with open(f"{prefix}_stats.csv") as stats:
        total = next(row for row in csv.DictReader(stats) if row["Name"] == "Aggregated")
    return {
        "setup": f"{workers} locust workers" if workers else "one locust process",
        "users": users,
        "seconds": seconds,
        "requests": int(total["Request Count"]),
        "requests_per_s": round(float(total["Requests/s"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--users", type=int, default=500)
    args = parser.parse_args()
    port = free_port()
    bare = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "bare.py"), str(port)])
    base = f"http://127.0.0.1:{port}"
    try:
        _wait(base)
        with tempfile.TemporaryDirectory() as work:
            for workers in (0, 2):
                print(json.dumps(run(args.seconds, workers, args.users, Path(work), base)))
    finally:
        bare.terminate()
        bare.wait(10)


if __name__ == "__main__":
    main()
