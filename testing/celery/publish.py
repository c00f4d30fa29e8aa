"""Publishes tasks with apply_async, as an application would, and prints what kombu counts.

  python publish.py --queue celery --count 10 [--priority N] [--countdown S] [--seconds S]
Prints one JSON object: {"published": N, "kombu_size": {queue: size}} where kombu_size is
kombu's own count of ready messages (the channel's _size for Redis; the passive declare's
message_count for AMQP), for comparison with celery-scale's reading.
"""
import argparse
import json

from app import app, sleep, tracked


def kombu_size(queue):
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        if hasattr(channel, "_size"):  # kombu's virtual transports (Redis)
            return channel._size(queue)
        return channel.queue_declare(queue=queue, passive=True).message_count


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--queue", default="celery")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--priority", type=int, default=None)
    p.add_argument("--countdown", type=float, default=None)
    p.add_argument("--seconds", type=float, default=0.0, help="how long each task sleeps")
    p.add_argument("--size-of", action="append", default=[], help="queues to report kombu's size of")
    p.add_argument("--track", default=None, help="publish the tracked task recording under this Redis key")
    a = p.parse_args()
    if app.conf.broker_url.split("://", 1)[0] in ("amqp", "pyamqp", "amqps"):
        # Wait for the broker's confirm of every publish, so the count read next includes
        # them all: without confirms a quorum queue may not have committed them yet.
        app.conf.broker_transport_options.setdefault("confirm_publish", True)
    opts = {"queue": a.queue}
    if a.priority is not None:
        opts["priority"] = a.priority
    if a.countdown is not None:
        opts["countdown"] = a.countdown
    for _ in range(a.count):
        if a.track:
            tracked.apply_async((a.seconds, a.track), **opts)
        else:
            sleep.apply_async((a.seconds,), **opts)
    sizes = {q: kombu_size(q) for q in (a.size_of or [a.queue])}
    print(json.dumps({"published": a.count, "kombu_size": sizes}))


if __name__ == "__main__":
    main()
