"""The reads of one celery-scale observation done by a plain redis-py loop, for comparing
memory: per queue LLEN of its four priority keys and LINDEX -1 of each (the oldest message,
its publish time read with json), then HLEN unacked; one pipeline per observation. Prints its
VmRSS and VmHWM (kB) after the loop, as `python VmRSS=... VmHWM=...`.

Usage: python observe_rss.py REDIS_URL PREFIX QUEUES ITERATIONS (run by observe_rss.rs).
"""

import json
import sys
import time

import redis


def status(name):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return -1


def main():
    url, prefix, queues, iterations = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    r = redis.Redis.from_url(url)
    keys = []
    for i in range(queues):
        bare = f"{prefix}q{i}"
        keys.append(bare)
        keys.extend(f"{bare}\x06\x16{p}" for p in (3, 6, 9))
    now = time.time()
    for _ in range(iterations):
        pipe = r.pipeline(transaction=False)
        for key in keys:
            pipe.llen(key)
            pipe.lindex(key, -1)
        pipe.hlen(f"{prefix}unacked")
        replies = pipe.execute()
        ready, oldest = 0, None
        for j in range(len(keys)):
            ready += replies[2 * j]
            tail = replies[2 * j + 1]
            if tail is not None:
                try:
                    stamp = json.loads(tail).get("properties", {}).get("published_at")
                    age = now - float(stamp)
                    oldest = age if oldest is None else max(oldest, age)
                except (ValueError, TypeError, AttributeError):
                    pass
        assert ready == queues, ready
        del replies, pipe
    print(f"python VmRSS={status('VmRSS')} VmHWM={status('VmHWM')} (kB) ready={ready}")


if __name__ == "__main__":
    main()
