"""publish.py with the publish-time stamp that celery-scale-redis documents.

Same arguments and output as publish.py. Before each task is published, the
`before_task_publish` handler below writes the wall-clock time (Unix seconds) into the message
header `published_at`, which celery-scale-redis reads (`publish_time_field = "published_at"`) for
the age of the oldest waiting task. This is the snippet an application adds.
"""
import time

from celery.signals import before_task_publish


@before_task_publish.connect
def stamp_published_at(headers=None, **kwargs):
    # Keep the first stamp: a retried task is published again with the same headers.
    headers.setdefault("published_at", time.time())


if __name__ == "__main__":
    import publish

    publish.main()
