"""moto's server with the one Auto Scaling behaviour it leaves out that Ember relies on: a
terminating lifecycle hook holds the instance (moto 5 stores hooks but terminates at once and has
no CompleteLifecycleAction). As AWS documents it
(https://docs.aws.amazon.com/autoscaling/ec2/userguide/lifecycle-hooks-overview.html): an
instance being terminated in a group with an `autoscaling:EC2_INSTANCE_TERMINATING` hook goes to
`Terminating:Wait`, no longer counts towards the desired capacity (a replacement launches unless
the desired capacity was decremented), and is terminated when someone calls
`CompleteLifecycleAction` with its instance id. Everything else is moto's own.

Run as moto's server: `python -m tests.platform.moto_lifecycle -H 127.0.0.1 -p PORT`.
"""

from __future__ import annotations

import sys
from typing import Any

from moto.autoscaling import models, responses
from moto.core.responses import EmptyResult

TERMINATING = "autoscaling:EC2_INSTANCE_TERMINATING"


def _state(backend: Any, instance_id: str) -> Any:
    return next(s for g in backend.autoscaling_groups.values() for s in g.instance_states
                if s.instance.id == instance_id)


def terminate_instance(self: Any, instance_id: str, should_decrement: bool) -> Any:
    state = _state(self, instance_id)
    group = state.instance.autoscaling_group
    hooked = any(h.auto_scaling_group_name == group.name and h.lifecycle_transition == TERMINATING
                 for h in self.lifecycle_hooks.values())
    if not hooked:
        return _moto_terminate(self, instance_id, should_decrement)
    original = group.desired_capacity
    if state.lifecycle_state != "Terminating:Wait":
        state.lifecycle_state = "Terminating:Wait"
        if should_decrement:
            group.desired_capacity = original - 1
        group.set_desired_capacity(group.desired_capacity)  # launches a replacement when not decremented
    return models.TerminateInstanceActivity(state.instance, original)


def complete_lifecycle_action(self: Any, group_name: str, hook_name: str, instance_id: str, result: str) -> None:
    group = self.autoscaling_groups[group_name]
    if f"{group_name}_{hook_name}" not in self.lifecycle_hooks:
        raise models.ValidationError(f"No Lifecycle Hook found for name {hook_name}")
    state = next((s for s in group.instance_states if s.instance.id == instance_id), None)
    if state is None or state.lifecycle_state != "Terminating:Wait":
        raise models.ValidationError(f"No active Lifecycle Action found with instance ID {instance_id}")
    group.instance_states = [s for s in group.instance_states if s is not state]
    self.ec2_backend.terminate_instances([instance_id])


def _complete_response(self: Any) -> Any:
    self.autoscaling_backend.complete_lifecycle_action(
        self._get_param("AutoScalingGroupName"), self._get_param("LifecycleHookName"),
        self._get_param("InstanceId"), self._get_param("LifecycleActionResult"))
    return EmptyResult()


_moto_terminate = models.AutoScalingBackend.terminate_instance
models.AutoScalingBackend.terminate_instance = terminate_instance  # type: ignore[method-assign]
models.AutoScalingBackend.complete_lifecycle_action = complete_lifecycle_action  # type: ignore[attr-defined]
responses.AutoScalingResponse.complete_lifecycle_action = _complete_response  # type: ignore[attr-defined]

if __name__ == "__main__":
    from moto.server import main

    main(sys.argv[1:])
