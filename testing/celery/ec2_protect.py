"""Keeps a busy Celery worker's EC2 instance from being chosen on scale-in: toggles the
instance's Auto Scaling scale-in protection from the worker host, on while the worker has tasks
(executing or reserved), off once it has been idle for --idle-checks checks in a row.

  python ec2_protect.py --group celery-workers --node celery@$(hostname) [--instance-id i-...]
                        [--queue celery ...] [--every 10] [--idle-checks 3] [--once]

Run it next to the worker (a systemd unit, a sidecar). The instance id defaults to the one the
instance metadata service (IMDSv2) reports. The Celery app is testing/celery/app.py's (broker
from CELERY_SCALE_TEST_BROKER); in your deployment import your own app instead. Needs
autoscaling:SetInstanceProtection on the group and autoscaling:DescribeAutoScalingInstances
(see docs/ec2.md). Prints one JSON line per change: {"instance", "busy", "protected"}.

An unprotected instance may be chosen by a scale-in at any moment, so while it is unprotected
(from the start, and after every release) the recipe reads the instance's lifecycle state
before it protects again and on every check. Once Auto Scaling is taking the instance out
(Terminating*, Detaching, Detached, Terminated, or the instance is no longer in the group),
protecting is pointless (and refused), so it tells the worker to stop consuming its queues
(--queue, default: every queue the worker consumes) so that it takes no new work, prints
{"instance", "lifecycle_state", "consuming": false} and exits 0; the tasks the worker already
runs finish behind the termination lifecycle hook (docs/ec2.md).
"""
import argparse
import json
import os
import sys
import time
import urllib.request

import boto3

from app import app

# Auto Scaling is taking the instance out of the group: no protection applies any more.
LEAVING = ("Terminating", "Terminated", "Detaching", "Detached", "Warmed:Terminat")


def instance_id_from_imds():
    token_req = urllib.request.Request(
        "http://169.254.169.254/latest/api/token",
        method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"},
    )
    token = urllib.request.urlopen(token_req, timeout=2).read().decode()
    id_req = urllib.request.Request(
        "http://169.254.169.254/latest/meta-data/instance-id",
        headers={"X-aws-ec2-metadata-token": token},
    )
    return urllib.request.urlopen(id_req, timeout=2).read().decode()


def busy(node):
    """Tasks the worker is executing or has reserved (prefetched), or None when it did not answer."""
    insp = app.control.inspect(destination=[node], timeout=2.0, limit=1)
    active = insp.active()
    reserved = insp.reserved()
    if active is None or node not in active:
        return None
    return len(active.get(node, [])) + len((reserved or {}).get(node, []))


def lifecycle_state(asg, instance):
    """The instance's lifecycle state in its group, or None when it is in no group (any more)."""
    found = asg.describe_auto_scaling_instances(InstanceIds=[instance]).get("AutoScalingInstances", [])
    return found[0].get("LifecycleState") if found else None


def leaving(state):
    return state is None or state.startswith(LEAVING)


def stop_consuming(node, queues):
    """Makes the worker take no new messages: cancels its consumers (running tasks go on)."""
    if not queues:
        answer = app.control.inspect(destination=[node], timeout=2.0, limit=1).active_queues() or {}
        queues = [q["name"] for q in answer.get(node, [])]
    for q in queues:
        app.control.cancel_consumer(q, destination=[node], reply=True, timeout=2.0)
    return queues


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--group", required=True)
    p.add_argument("--node", required=True, help="the worker's node name, e.g. celery@host")
    p.add_argument("--instance-id", default=None)
    p.add_argument("--queue", action="append", default=[],
                   help="a queue the worker consumes (repeat); default: ask the worker")
    p.add_argument("--endpoint", default=os.environ.get("AWS_ENDPOINT_URL"))
    p.add_argument("--every", type=float, default=10.0)
    p.add_argument("--idle-checks", type=int, default=3)
    p.add_argument("--once", action="store_true")
    a = p.parse_args()
    instance = a.instance_id or instance_id_from_imds()
    kw = {"region_name": os.environ.get("AWS_REGION", "us-east-1")}
    if a.endpoint:
        kw["endpoint_url"] = a.endpoint
    asg = boto3.client("autoscaling", **kw)
    protected = None
    idle = 0
    while True:
        if not protected:
            # Unprotected (at start, or released): a scale-in may have chosen this instance.
            state = lifecycle_state(asg, instance)
            if leaving(state):
                queues = stop_consuming(a.node, a.queue)
                print(json.dumps({"instance": instance, "lifecycle_state": state,
                                  "consuming": False, "queues": queues}), flush=True)
                return 0
        n = busy(a.node)
        if n:
            idle = 0
        else:
            # An unanswered inspect counts as idle too: a dead worker must not pin its instance.
            idle += 1
        want = True if n else (protected if idle < a.idle_checks and protected is not None else False)
        if want != protected:
            try:
                asg.set_instance_protection(
                    InstanceIds=[instance],
                    AutoScalingGroupName=a.group,
                    ProtectedFromScaleIn=want,
                )
            except asg.exceptions.ClientError:
                # Refused: chosen for termination between the check above and now?
                state = lifecycle_state(asg, instance)
                if not leaving(state):
                    raise
                queues = stop_consuming(a.node, a.queue)
                print(json.dumps({"instance": instance, "lifecycle_state": state,
                                  "consuming": False, "queues": queues}), flush=True)
                return 0
            protected = want
            print(json.dumps({"instance": instance, "busy": n, "protected": want}), flush=True)
        if a.once:
            return 0
        time.sleep(a.every)


if __name__ == "__main__":
    sys.exit(main())
