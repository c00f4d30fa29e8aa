"""ECS task scale-in protection for Celery workers: protect the ECS task while any of its
worker processes runs a task, release it when the whole worker is idle.

Load it in the worker (`celery -A app worker -I ecs_protection`, or import it from your app's
module). ECS sets ECS_AGENT_URI in every task; without it (not on ECS) this does nothing.
Scale-in then stops only unprotected (idle) tasks; a protected task is kept until it releases
protection or ExpiresInMinutes passes (1-2880, CELERY_SCALE_PROTECTION_MINUTES, default 60).
While tasks keep starting, protection is renewed once half of that has passed, so a worker
that stays busy for hours stays protected; a worker that is stuck stays protected at most
ExpiresInMinutes after its last task started.

Prefork children share one record per worker node: a JSON file {task_id: pid} guarded by
fcntl.flock. A task's entry is added on task_prerun and removed on task_postrun; entries of
processes that died mid-task (hard time limit, OOM kill) are dropped whenever the file is
touched. The agent is called when the record goes from empty to non-empty (protect) and back
(release).

Releasing protection may let a scale-in that waited for this task stop it at once. So after a
release, and before protecting for a new task, the recipe reads the task's DesiredStatus from
the task metadata endpoint ($ECS_CONTAINER_METADATA_URI_V4/task): when it is STOPPED, ECS is
stopping the task, and the worker starts its warm shutdown itself (SIGTERM to the worker's main
process), so it takes no more work: the running task finishes within the stop timeout and the
prefetched messages go back to the broker. Without that variable (an agent older than 1.39, or
not on ECS) there is no check.
"""
import fcntl
import json
import os
import tempfile
import time
import urllib.request

import signal

from billiard.process import current_process
from celery.signals import task_postrun, task_prerun

EXPIRES_IN_MINUTES = int(os.environ.get("CELERY_SCALE_PROTECTION_MINUTES", "60"))
# One record per worker node: prefork children share their parent's pid as getppid().
_RECORD = os.environ.get(
    "CELERY_SCALE_PROTECTION_FILE",
    os.path.join(tempfile.gettempdir(), f"celery-ecs-protection-{os.getppid()}.json"),
)


def _set_protection(enabled):
    """PUT $ECS_AGENT_URI/task-protection/v1/state; True when the agent accepted it."""
    agent = os.environ.get("ECS_AGENT_URI")
    if not agent:
        return False
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
        return True
    except OSError as e:  # never fail a task because the agent did not answer
        print(f"ecs task protection: {e}")
        return False


def _desired_status():
    """The ECS task's DesiredStatus from the task metadata endpoint v4; None when unknown."""
    metadata = os.environ.get("ECS_CONTAINER_METADATA_URI_V4")
    if not metadata:
        return None
    try:
        with urllib.request.urlopen(f"{metadata}/task", timeout=5) as answer:
            status = json.load(answer).get("DesiredStatus")
            return status if isinstance(status, str) else None
    except (OSError, ValueError) as e:
        print(f"ecs task metadata: {e}")
        return None


def _stop_taking_work_if_stopping():
    """When ECS is stopping this task, begins the worker's warm shutdown; True then."""
    if _desired_status() != "STOPPED":
        return False
    # In a prefork child the worker's main process is the parent; in solo/threads it is us.
    main = os.getpid() if current_process().name == "MainProcess" else os.getppid()
    print("ecs task protection: the task is stopping; warm shutdown, no more work taken")
    try:
        os.kill(main, signal.SIGTERM)
    except OSError as e:
        print(f"ecs task protection: {e}")
    return True


def _alive(pid):
    """Whether pid runs; a zombie (dead, not yet reaped by the worker) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # "pid (comm) state ...": the state follows the last ")".
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _update(task_id, running):
    """Adds (running) or removes task_id under the lock; protects, renews or releases."""
    with open(_RECORD, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.seek(0)
            text = f.read().strip()
            state = json.loads(text) if text else {}
            active = {t: p for t, p in state.get("active", {}).items() if _alive(p)}
            protected_at = state.get("protected_at")
            was_busy = bool(active)
            if running:
                active[task_id] = os.getpid()
            else:
                active.pop(task_id, None)
            now = time.time()
            if active and not was_busy and _stop_taking_work_if_stopping():
                # ECS stops this task anyway (protection would be refused): no protect.
                pass
            elif active and (
                not was_busy
                or protected_at is None
                or now - protected_at > EXPIRES_IN_MINUTES * 30
            ):
                if _set_protection(True):
                    protected_at = now
            elif was_busy and not active:
                _set_protection(False)
                protected_at = None
                # A scale-in that waited for this task may stop it now: take no more work.
                _stop_taking_work_if_stopping()
            f.seek(0)
            f.truncate()
            json.dump({"active": active, "protected_at": protected_at}, f)
            f.flush()
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@task_prerun.connect
def _protect(task_id=None, **_):
    _update(task_id, True)


@task_postrun.connect
def _release(task_id=None, **_):
    _update(task_id, False)
