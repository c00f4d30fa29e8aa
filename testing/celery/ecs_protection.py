"""ECS task scale-in protection for Celery workers: protect the ECS task while any of its
worker processes runs a task, release it when the whole worker is idle.

Load it in the worker (`celery -A app worker -I ecs_protection`, or import it from your app's
module). ECS sets ECS_AGENT_URI in every task; without it (not on ECS) this does nothing.
Scale-in then stops only unprotected (idle) tasks; a protected task is kept until it releases
protection or ExpiresInMinutes passes (1-2880). Set it above your longest task.

Prefork children share one counter per worker node (a file guarded by fcntl.flock), so the task
is protected on the first task that starts and released when the last one ends.
"""
import fcntl
import json
import os
import tempfile
import urllib.request

from celery.signals import task_postrun, task_prerun

EXPIRES_IN_MINUTES = int(os.environ.get("CELERY_SCALE_PROTECTION_MINUTES", "60"))
_COUNTER = os.path.join(tempfile.gettempdir(), f"celery-ecs-protection-{os.getppid()}.count")


def _set_protection(enabled):
    agent = os.environ.get("ECS_AGENT_URI")
    if not agent:
        return
    body = {"ProtectionEnabled": enabled}
    if enabled:
        body["ExpiresInMinutes"] = EXPIRES_IN_MINUTES
    req = urllib.request.Request(
        f"{agent}/task-protection/v1/state",
        data=json.dumps(body).encode(),
        method="PUT",
        headers={"Content-Type": "application/json"},
    )
    try:
        urllib.request.urlopen(req, timeout=5).read()
    except OSError as e:  # never fail a task because the agent did not answer
        print(f"ecs task protection: {e}")


def _add(delta):
    """Adds delta to the node's active count under a lock; calls the agent on 0<->1."""
    with open(_COUNTER, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        text = f.read().strip()
        before = int(text) if text else 0
        after = max(0, before + delta)
        f.seek(0)
        f.truncate()
        f.write(str(after))
        f.flush()
        if before == 0 and after > 0:
            _set_protection(True)
        elif before > 0 and after == 0:
            _set_protection(False)
        fcntl.flock(f, fcntl.LOCK_UN)


@task_prerun.connect
def _protect(**_):
    _add(1)


@task_postrun.connect
def _release(**_):
    _add(-1)
