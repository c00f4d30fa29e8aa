"""Keeps a busy Celery worker's EC2 instance from being chosen on scale-in: toggles the
instance's Auto Scaling scale-in protection from the worker host, on while the worker has tasks
(executing or reserved), off once it has been idle for --idle-checks checks in a row.

  python ec2_protect.py --group celery-workers --node celery@$(hostname) [--instance-id i-...]
                        [--every 10] [--idle-checks 3] [--once]

Run it next to the worker (a systemd unit, a sidecar). The instance id defaults to the one the
instance metadata service (IMDSv2) reports. The Celery app is testing/celery/app.py's (broker
from CELERY_SCALE_TEST_BROKER); in your deployment import your own app instead. Needs
autoscaling:SetInstanceProtection on the group (see docs/ec2.md). Prints one JSON line per
change: {"instance", "busy", "protected"}.
"""
import argparse
import json
import os
import sys
import time
import urllib.request

import boto3

from app import app


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
    insp = app.control.inspect(destination=[node], timeout=2.0)
    active = insp.active()
    reserved = insp.reserved()
    if active is None or node not in active:
        return None
    return len(active.get(node, [])) + len((reserved or {}).get(node, []))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--group", required=True)
    p.add_argument("--node", required=True, help="the worker's node name, e.g. celery@host")
    p.add_argument("--instance-id", default=None)
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
        n = busy(a.node)
        if n:
            idle = 0
        else:
            # An unanswered inspect counts as idle too: a dead worker must not pin its instance.
            idle += 1
        want = True if n else (protected if idle < a.idle_checks and protected is not None else False)
        if want != protected:
            asg.set_instance_protection(
                InstanceIds=[instance],
                AutoScalingGroupName=a.group,
                ProtectedFromScaleIn=want,
            )
            protected = want
            print(json.dumps({"instance": instance, "busy": n, "protected": want}), flush=True)
        if a.once:
            return
        time.sleep(a.every)


if __name__ == "__main__":
    sys.exit(main())
