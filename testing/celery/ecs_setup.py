"""Creates, shows and deletes an ECS cluster with one service of Celery workers (for moto or a
real account), for the daemon's end-to-end tests.

  python ecs_setup.py create --cluster c --service workers [--desired 0]
  python ecs_setup.py show   --cluster c --service workers
  python ecs_setup.py delete --cluster c --service workers

The endpoint is --endpoint, else AWS_ENDPOINT_URL (moto: http://127.0.0.1:5000); region and
credentials come from boto3's usual chain. Every command prints JSON:
{"cluster", "service", "desired", "running", "pending"}.
"""
import argparse
import json
import os

import boto3


def client(endpoint):
    kw = {"region_name": os.environ.get("AWS_REGION", "us-east-1")}
    if endpoint:
        kw["endpoint_url"] = endpoint
    return boto3.client("ecs", **kw)


def state(ecs, a):
    s = ecs.describe_services(cluster=a.cluster, services=[a.service])["services"][0]
    return {
        "cluster": a.cluster,
        "service": a.service,
        "desired": s["desiredCount"],
        "running": s["runningCount"],
        "pending": s["pendingCount"],
    }


def create(ecs, a):
    ecs.create_cluster(clusterName=a.cluster)
    ecs.register_task_definition(
        family="celery-worker",
        containerDefinitions=[{"name": "worker", "image": "python:3.12", "memory": 512}],
    )
    ecs.create_service(
        cluster=a.cluster,
        serviceName=a.service,
        taskDefinition="celery-worker",
        desiredCount=a.desired,
    )


def delete(ecs, a):
    ecs.delete_service(cluster=a.cluster, service=a.service, force=True)
    ecs.delete_cluster(cluster=a.cluster)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["create", "show", "delete"])
    p.add_argument("--cluster", required=True)
    p.add_argument("--service", default="workers")
    p.add_argument("--endpoint", default=os.environ.get("AWS_ENDPOINT_URL"))
    p.add_argument("--desired", type=int, default=0)
    a = p.parse_args()
    ecs = client(a.endpoint)
    if a.command == "create":
        create(ecs, a)
    elif a.command == "delete":
        delete(ecs, a)
        print(json.dumps({"cluster": a.cluster, "deleted": True}))
        return
    print(json.dumps(state(ecs, a)))


if __name__ == "__main__":
    main()
