"""Creates, shows and deletes an EC2 Auto Scaling group of Celery workers (for moto or a real
account), for docs/ec2.md's walkthrough and the EC2 tests.

  python ec2_setup.py create --group celery-workers --min 0 --max 5 --desired 0
  python ec2_setup.py show   --group celery-workers
  python ec2_setup.py watch  --group celery-workers [--every 1]
  python ec2_setup.py delete --group celery-workers

`create` makes a launch template (`<group>-lt`, through the EC2 API) and the group on it, in one
availability zone. The endpoint is --endpoint, else AWS_ENDPOINT_URL (moto:
http://127.0.0.1:5000); region and credentials come from boto3's usual chain (AWS_REGION,
AWS_ACCESS_KEY_ID, ...). Every command prints JSON: {"group", "min", "max", "desired",
"instances": {lifecycle state: count}}.
"""
import argparse
import json
import os
import sys
import time

import boto3


def clients(endpoint):
    kw = {"region_name": os.environ.get("AWS_REGION", "us-east-1")}
    if endpoint:
        kw["endpoint_url"] = endpoint
    return boto3.client("ec2", **kw), boto3.client("autoscaling", **kw)


def state(asg, group):
    found = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[group])["AutoScalingGroups"]
    if not found:
        return {"group": group, "missing": True}
    g = found[0]
    counts = {}
    for i in g.get("Instances", []):
        counts[i["LifecycleState"]] = counts.get(i["LifecycleState"], 0) + 1
    return {
        "group": group,
        "min": g["MinSize"],
        "max": g["MaxSize"],
        "desired": g["DesiredCapacity"],
        "instances": counts,
    }


def create(ec2, asg, a):
    template = f"{a.group}-lt"
    existing = ec2.describe_launch_templates(
        Filters=[{"Name": "launch-template-name", "Values": [template]}]
    )["LaunchTemplates"]
    if not existing:
        ec2.create_launch_template(
            LaunchTemplateName=template,
            LaunchTemplateData={"ImageId": a.image, "InstanceType": a.instance_type},
        )
    asg.create_auto_scaling_group(
        AutoScalingGroupName=a.group,
        LaunchTemplate={"LaunchTemplateName": template, "Version": "$Latest"},
        MinSize=a.min,
        MaxSize=a.max,
        DesiredCapacity=a.desired,
        AvailabilityZones=[a.zone],
    )


def delete(ec2, asg, a):
    try:
        asg.delete_auto_scaling_group(AutoScalingGroupName=a.group, ForceDelete=True)
    except asg.exceptions.ClientError as e:  # already gone
        print(f"delete group: {e}", file=sys.stderr)
    try:
        ec2.delete_launch_template(LaunchTemplateName=f"{a.group}-lt")
    except ec2.exceptions.ClientError as e:
        print(f"delete launch template: {e}", file=sys.stderr)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["create", "show", "watch", "delete"])
    p.add_argument("--group", required=True)
    p.add_argument("--endpoint", default=os.environ.get("AWS_ENDPOINT_URL"))
    p.add_argument("--min", type=int, default=0)
    p.add_argument("--max", type=int, default=5)
    p.add_argument("--desired", type=int, default=0)
    p.add_argument("--image", default="ami-12c6146b")
    p.add_argument("--instance-type", default="t3.micro")
    p.add_argument("--zone", default="us-east-1a")
    p.add_argument("--every", type=float, default=1.0, help="watch: seconds between lines")
    a = p.parse_args()
    ec2, asg = clients(a.endpoint)
    if a.command == "create":
        create(ec2, asg, a)
    elif a.command == "delete":
        delete(ec2, asg, a)
        print(json.dumps({"group": a.group, "deleted": True}))
        return
    elif a.command == "watch":
        last = None
        try:
            while True:
                now = state(asg, a.group)
                if now != last:
                    print(json.dumps({"t": time.strftime("%H:%M:%S"), **now}), flush=True)
                    last = now
                time.sleep(a.every)
        except KeyboardInterrupt:
            return
    print(json.dumps(state(asg, a.group)))


if __name__ == "__main__":
    main()
