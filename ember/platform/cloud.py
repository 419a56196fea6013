"""The machines under the platform: a `CloudBackend` the node scaler drives, with an AWS Auto
Scaling implementation (boto3) here and a local one for `ember up` (ember.platform.local_fleet).

Both behave like an Auto Scaling group: a desired capacity the backend converges to, instances
with ids, and a terminate that decrements the desired capacity with it (so the group does not
replace the node). On AWS, Ember protects every in-service instance from the group's own
scale-in (Ember picks which node goes, after draining it), and a terminating lifecycle hook
holds instances that something else terminates (an instance refresh, an operator) in
`Terminating:Wait` until Ember has drained them and completes the action.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

from ember.config import Settings
from ember.errors import ConfigError, EmberError

log = logging.getLogger(__name__)

__all__ = ["AwsAutoScalingBackend", "CloudBackend", "CloudError", "make_backend"]

LIFECYCLE_HOOK = "ember-drain"  # the terminating hook terraform creates on the worker group


class CloudError(EmberError):
    """The cloud API refused or failed a call."""

    status_code = 502
    error_type = "server_error"


class CloudBackend(Protocol):
    """What the node scaler needs of a cloud. Units: counts; ids are the cloud's instance ids."""

    name: str

    def desired_capacity(self) -> int: ...

    def set_desired_capacity(self, count: int) -> None: ...

    def terminate(self, cloud_id: str) -> None:
        """Terminate one instance and decrement the desired capacity with it."""
        ...

    def instances(self) -> dict[str, str]:
        """Every instance of the group: id -> lifecycle state ("Pending", "InService",
        "Terminating:Wait", ...)."""
        ...

    def protect(self, cloud_ids: list[str]) -> None:
        """Protect these instances from the group's own scale-in (Ember chooses which node goes)."""
        ...

    def complete_termination(self, cloud_id: str) -> None:
        """A node held by the terminating lifecycle hook is drained: let the termination go on."""
        ...

    def put_metrics(self, values: Mapping[str, float]) -> None:
        """Publish the node scaler's gauges (placements waiting, nodes by state)."""
        ...

    def close(self) -> None: ...


def make_backend(settings: Settings) -> CloudBackend | None:
    """The backend `settings.node_backend` names, or None ("none": nobody scales nodes)."""
    if settings.node_backend == "none":
        return None
    if settings.node_backend == "aws":
        if not settings.aws_autoscaling_group:
            raise ConfigError("EMBER_NODE_BACKEND=aws needs EMBER_AWS_AUTOSCALING_GROUP")
        return AwsAutoScalingBackend(settings.aws_autoscaling_group, namespace=settings.cloudwatch_namespace,
                                     endpoint_url=settings.aws_endpoint_url)
    from ember.platform.local_fleet import LocalWorkerFleet

    return LocalWorkerFleet(settings)


def _cloud_errors(what: str):  # noqa: ANN202 - a decorator factory
    import functools

    def wrap(fn):  # noqa: ANN001, ANN202
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            from botocore.exceptions import BotoCoreError, ClientError

            try:
                return fn(*args, **kwargs)
            except ClientError as e:
                err = e.response.get("Error", {})
                raise CloudError(f"AWS {what}: {err.get('Code', 'error')}: {err.get('Message', e)}") from e
            except BotoCoreError as e:
                raise CloudError(f"AWS {what}: {e}") from e
        return inner
    return wrap


class AwsAutoScalingBackend:
    """One EC2 Auto Scaling group of GPU workers, and CloudWatch metrics in `namespace`."""

    name = "aws"

    def __init__(self, group: str, *, namespace: str = "Ember", endpoint_url: str | None = None,
                 session: Any = None) -> None:
        import boto3

        session = session or boto3.session.Session()
        self.group = group
        self.namespace = namespace
        self.autoscaling = session.client("autoscaling", endpoint_url=endpoint_url)
        self.cloudwatch = session.client("cloudwatch", endpoint_url=endpoint_url)

    @_cloud_errors("describe group")
    def _group(self) -> dict[str, Any]:
        groups = self.autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[self.group])
        if not groups["AutoScalingGroups"]:
            raise CloudError(f"AWS: no Auto Scaling group {self.group!r}")
        return groups["AutoScalingGroups"][0]

    def desired_capacity(self) -> int:
        return int(self._group()["DesiredCapacity"])

    @_cloud_errors("set desired capacity")
    def set_desired_capacity(self, count: int) -> None:
        group = self._group()
        count = max(int(group["MinSize"]), min(int(group["MaxSize"]), count))
        self.autoscaling.set_desired_capacity(AutoScalingGroupName=self.group, DesiredCapacity=count,
                                              HonorCooldown=False)

    @_cloud_errors("terminate instance")
    def terminate(self, cloud_id: str) -> None:
        self.autoscaling.terminate_instance_in_auto_scaling_group(InstanceId=cloud_id,
                                                                  ShouldDecrementDesiredCapacity=True)

    def instances(self) -> dict[str, str]:
        return {i["InstanceId"]: i["LifecycleState"] for i in self._group().get("Instances", [])}

    @_cloud_errors("protect instances")
    def protect(self, cloud_ids: list[str]) -> None:
        if cloud_ids:
            self.autoscaling.set_instance_protection(InstanceIds=cloud_ids, AutoScalingGroupName=self.group,
                                                     ProtectedFromScaleIn=True)

    def unprotected(self) -> list[str]:
        return [i["InstanceId"] for i in self._group().get("Instances", [])
                if i["LifecycleState"] == "InService" and not i.get("ProtectedFromScaleIn")]

    @_cloud_errors("complete lifecycle action")
    def complete_termination(self, cloud_id: str) -> None:
        self.autoscaling.complete_lifecycle_action(LifecycleHookName=LIFECYCLE_HOOK, AutoScalingGroupName=self.group,
                                                   InstanceId=cloud_id, LifecycleActionResult="CONTINUE")

    @_cloud_errors("put metric data")
    def put_metrics(self, values: Mapping[str, float]) -> None:
        data = [{"MetricName": name, "Value": float(v), "Unit": "Count",
                 "Dimensions": [{"Name": "AutoScalingGroupName", "Value": self.group}]}
                for name, v in sorted(values.items())]
        for i in range(0, len(data), 20):
            self.cloudwatch.put_metric_data(Namespace=self.namespace, MetricData=data[i:i + 20])

    def close(self) -> None:
        self.autoscaling.close()
        self.cloudwatch.close()
