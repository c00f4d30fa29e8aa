"""A Celery app for celery-scale's tests: real Celery as producer and worker.

Configured from the environment so every test can point it at its own broker and options:
  CELERY_SCALE_TEST_BROKER   broker URL (redis://..., amqp://...)            required
  CELERY_SCALE_TEST_OPTIONS  JSON of broker_transport_options (priority_steps, sep,
                             global_keyprefix, queue_order_strategy, ...)      optional
  CELERY_SCALE_TEST_CONFIG   JSON of extra Celery settings (task_acks_late, ...) optional
Tasks: `sleep(seconds)` and `noop()`. Publish with publish.py; run a worker with
  celery -A app worker -c 2 --prefetch-multiplier 4 -Q celery
"""
import json
import os
import time

from celery import Celery

app = Celery("celery_scale_test", broker=os.environ["CELERY_SCALE_TEST_BROKER"])
app.conf.broker_transport_options = json.loads(os.environ.get("CELERY_SCALE_TEST_OPTIONS", "{}"))
app.conf.update(
    task_default_queue="celery",
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    **json.loads(os.environ.get("CELERY_SCALE_TEST_CONFIG", "{}")),
)


@app.task(name="celery_scale_test.sleep")
def sleep(seconds):
    time.sleep(float(seconds))
    return seconds


@app.task(name="celery_scale_test.tracked", bind=True)
def tracked(self, seconds, key):
    """Sleeps `seconds`, recording its task id in the Redis sets `{key}:started` (with the node
    that runs it, in the hash `{key}:where`) and `{key}:done`, for tests that count tasks killed
    mid-run or lost. `key` lives on the broker's Redis."""
    import redis

    r = redis.Redis.from_url(app.conf.broker_url)
    r.sadd(f"{key}:started", self.request.id)
    r.hset(f"{key}:where", self.request.id, self.request.hostname or "")
    time.sleep(float(seconds))
    r.sadd(f"{key}:done", self.request.id)
    return seconds


@app.task(name="celery_scale_test.noop")
def noop():
    return None
