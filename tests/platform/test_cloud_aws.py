"""The AWS backend against moto's server on loopback: the Auto Scaling and CloudWatch calls the
node scaler makes, checked by reading the group back (moto does not evaluate scaling policies)."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from ember.config import Settings
from ember.platform.cloud import AwsAutoScalingBackend, CloudError, make_backend
from ember.platform.redis_server import free_port

CREDS = {"region_name": "us-east-1", "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture()
def group(moto_url: str) -> tuple[str, boto3.session.Session]:
    session = boto3.session.Session(**CREDS)
    ec2 = session.client("ec2", endpoint_url=moto_url)
    asg = session.client("autoscaling", endpoint_url=moto_url)
    name = f"ember-workers-{time.monotonic_ns()}"
    ami = ec2.describe_images()["Images"][0]["ImageId"]
    lt = ec2.create_launch_template(LaunchTemplateName=name, LaunchTemplateData={"ImageId": ami,
                                                                                 "InstanceType": "g5.xlarge"})
    subnet = ec2.describe_subnets()["Subnets"][0]["SubnetId"]
    asg.create_auto_scaling_group(AutoScalingGroupName=name, MinSize=0, MaxSize=4, DesiredCapacity=1,
                                  LaunchTemplate={"LaunchTemplateId": lt["LaunchTemplate"]["LaunchTemplateId"]},
                                  VPCZoneIdentifier=subnet)
    return name, session


def test_scale_out_protect_and_terminate_with_decrement(group, moto_url: str) -> None:
    name, session = group
    backend = AwsAutoScalingBackend(name, endpoint_url=moto_url, session=session)
    asg = session.client("autoscaling", endpoint_url=moto_url)
    assert backend.desired_capacity() == 1
    backend.set_desired_capacity(3)
    described = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]
    assert described["DesiredCapacity"] == 3
    assert len(backend.instances()) == 3
    backend.set_desired_capacity(99)  # clamped to the group's MaxSize
    assert backend.desired_capacity() == 4

    # Ember, not the group, picks which node goes: in-service instances are protected.
    backend.protect(backend.unprotected())
    rows = asg.describe_auto_scaling_instances()["AutoScalingInstances"]
    assert all(r["ProtectedFromScaleIn"] for r in rows if r["AutoScalingGroupName"] == name)
    assert backend.unprotected() == []

    victim = sorted(backend.instances())[0]
    backend.terminate(victim)
    described = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]
    assert described["DesiredCapacity"] == 3  # decremented: the group does not replace the node
    assert victim not in {i["InstanceId"] for i in described["Instances"]}


def test_metrics_go_to_the_ember_namespace(group, moto_url: str) -> None:
    name, session = group
    backend = AwsAutoScalingBackend(name, endpoint_url=moto_url, session=session)
    backend.put_metrics({"PlacementsWaiting": 3, "NodesActive": 2, "NodesDraining": 1})
    cw = session.client("cloudwatch", endpoint_url=moto_url)
    metrics = cw.list_metrics(Namespace="Ember")["Metrics"]
    names = {m["MetricName"] for m in metrics
             if {"Name": "AutoScalingGroupName", "Value": name} in m["Dimensions"]}
    assert names == {"PlacementsWaiting", "NodesActive", "NodesDraining"}


def test_unknown_group_is_a_cloud_error(moto_url: str) -> None:
    backend = AwsAutoScalingBackend("no-such-group", endpoint_url=moto_url,
                                    session=boto3.session.Session(**CREDS))
    with pytest.raises(CloudError, match="no Auto Scaling group"):
        backend.desired_capacity()


def test_make_backend_needs_a_group_for_aws() -> None:
    from ember.errors import ConfigError

    assert make_backend(Settings(node_backend="none")) is None
    with pytest.raises(ConfigError, match="EMBER_AWS_AUTOSCALING_GROUP"):
        make_backend(Settings(node_backend="aws"))
