"""The AWS backend against moto's server on loopback: the Auto Scaling and CloudWatch calls the
node scaler makes, checked by reading the group back (moto does not evaluate scaling policies)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest

from ember.config import Settings
from ember.platform.cloud import AwsAutoScalingBackend, CloudError, make_backend
from ember.platform.redis_server import free_port

CREDS = {"region_name": "us-east-1", "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


def _moto_server(cmd: list[str]) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)],
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


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    yield from _moto_server([str(Path(sys.executable).parent / "moto_server")])


@pytest.fixture(scope="module")
def hooked_moto_url() -> Iterator[str]:
    """moto with the terminating lifecycle hook AWS documents (tests/platform/moto_lifecycle.py)."""
    yield from _moto_server([sys.executable, str(Path(__file__).with_name("moto_lifecycle.py"))])


def _group(url: str, *, hook: bool = False) -> tuple[str, boto3.session.Session]:
    session = boto3.session.Session(**CREDS)
    ec2 = session.client("ec2", endpoint_url=url)
    asg = session.client("autoscaling", endpoint_url=url)
    name = f"ember-workers-{time.monotonic_ns()}"
    ami = ec2.describe_images()["Images"][0]["ImageId"]
    lt = ec2.create_launch_template(LaunchTemplateName=name, LaunchTemplateData={"ImageId": ami,
                                                                                 "InstanceType": "g5.xlarge"})
    subnet = ec2.describe_subnets()["Subnets"][0]["SubnetId"]
    asg.create_auto_scaling_group(AutoScalingGroupName=name, MinSize=0, MaxSize=4, DesiredCapacity=1,
                                  LaunchTemplate={"LaunchTemplateId": lt["LaunchTemplate"]["LaunchTemplateId"]},
                                  VPCZoneIdentifier=subnet)
    if hook:  # as terraform/modules/workers creates it
        asg.put_lifecycle_hook(LifecycleHookName="ember-drain", AutoScalingGroupName=name,
                               LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING", DefaultResult="CONTINUE",
                               HeartbeatTimeout=900)
    return name, session


@pytest.fixture()
def group(moto_url: str) -> tuple[str, boto3.session.Session]:
    return _group(moto_url)


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


def test_gateway_node_scaler_drives_the_group(group, moto_url: str, redis_url: str, tmp_path: Path) -> None:
    """A real gateway with EMBER_NODE_BACKEND=aws against moto: two idle registered nodes are drained
    and terminated with the desired capacity decremented; requests waiting for room (as another
    gateway reports them) raise it again; metrics go to CloudWatch."""
    import redis as redis_lib

    from ember.platform.cluster import DeviceSpec, RedisCluster
    from ember.platform.state import Keys
    from tests.platform.conftest import start_gateway

    name, session = group
    asg = session.client("autoscaling", endpoint_url=moto_url)
    backend = AwsAutoScalingBackend(name, endpoint_url=moto_url, session=session)
    backend.set_desired_capacity(2)
    ids = sorted(backend.instances())
    cluster = RedisCluster(redis_lib.Redis.from_url(redis_url, decode_responses=True), heartbeat_ttl_s=300)
    for i, cid in enumerate(ids):
        cluster.register_node(f"n{i}", f"http://127.0.0.1:1/n{i}", [DeviceSpec("cuda:0", 1 << 30)], {"remote": 1e9},
                              cloud_instance_id=cid)
    env = _scaling_gateway_env(redis_url, tmp_path, name, moto_url)
    gateway = start_gateway(tmp_path, env)
    try:
        _until(lambda: backend.desired_capacity() == 0 and not backend.instances(), gateway)
        assert cluster.live_nodes() == [] and cluster.draining_nodes() == set()
        # Another gateway has 3 requests waiting for room: one node is enough for them.
        cluster.r.hset(Keys.placements_waiting, "gw-other", f"3 {time.time():.3f}")
        _until(lambda: backend.desired_capacity() == 1, gateway)
        _until(lambda: backend.unprotected() == [] and len(backend.instances()) == 1, gateway)
        rows = asg.describe_auto_scaling_instances()["AutoScalingInstances"]
        assert [r["ProtectedFromScaleIn"] for r in rows if r["AutoScalingGroupName"] == name] == [True]
        cw = session.client("cloudwatch", endpoint_url=moto_url)
        names = {m["MetricName"] for m in cw.list_metrics(Namespace="Ember")["Metrics"]
                 if {"Name": "AutoScalingGroupName", "Value": name} in m["Dimensions"]}
        assert {"PlacementsWaiting", "NodesActive", "NodesDraining", "NodesBooting", "DesiredNodes"} <= names
        log = gateway.output()
        assert "draining n0" in log and "terminating n1" in log
        # ember_nodes: the lease holder's last step, and nothing once another gateway holds the lease
        # (the counts a gateway last set used to stay exported for good, counted again in any sum)
        _until(lambda: _nodes_gauge(gateway.url) == {"active": 0.0, "draining": 0.0, "booting": 1.0}, gateway)
        cluster.r.set(Keys.lease("nodescaler"), "gw-elsewhere", px=60_000)
        _until(lambda: _nodes_gauge(gateway.url) == {}, gateway, 10)
        cluster.r.delete(Keys.lease("nodescaler"))
        _until(lambda: _nodes_gauge(gateway.url) == {"active": 0.0, "draining": 0.0, "booting": 1.0}, gateway)
    finally:
        gateway.stop()


def test_a_draining_nodes_idle_instances_are_unloaded_then_it_is_terminated(group, moto_url: str, redis_url: str,
                                                                           tmp_path: Path) -> None:
    """A node marked draining still holds an idle ready instance: the node scaler unloads it (the
    instance leaves Redis and its worker is told to drop it), then terminates the node. This path
    called a method the invoker no longer had: the node scaler's task died on the AttributeError and
    no node was scaled again."""
    import redis as redis_lib

    from ember.platform.cluster import DeviceSpec, RedisCluster
    from ember.platform.gateway.protocol import FunctionSpec
    from ember.platform.state import Keys
    from ember.scheduler.view import PlacementRequest
    from tests.platform.conftest import start_gateway
    from tests.platform.test_cluster import FirstFit

    name, session = group
    backend = AwsAutoScalingBackend(name, endpoint_url=moto_url, session=session)
    backend.set_desired_capacity(1)
    (cid,) = backend.instances()
    cluster = RedisCluster(redis_lib.Redis.from_url(redis_url, decode_responses=True), heartbeat_ttl_s=300)
    cluster.register_node("d0", "http://127.0.0.1:1/d0", [DeviceSpec("cuda:0", 1 << 30)], {"remote": 1e9},
                          cloud_instance_id=cid)
    spec = FunctionSpec(name="idle-fn", checkpoint="ck", nbytes=1 << 20, scaling={"keep_alive_s": 3600})
    cluster.r.hset(Keys.functions, "idle-fn", spec.model_dump_json())  # kept alive: the autoscaler leaves it
    placed = cluster.place(PlacementRequest(function="idle-fn", checkpoint="ck", nbytes=1 << 20), FirstFit())
    assert placed is not None and cluster.begin_load(placed.instance_id)
    assert cluster.mark_ready(placed.instance_id, "idle-fn")
    cluster.set_draining("d0", True)
    env = _scaling_gateway_env(redis_url, tmp_path, name, moto_url)
    gateway = start_gateway(tmp_path, env)
    try:
        _until(lambda: cluster.instance(placed.instance_id) is None, gateway)
        _until(lambda: backend.desired_capacity() == 0 and not backend.instances(), gateway)
        log = gateway.output()
        assert "terminating d0" in log and f"drop of {placed.instance_id} on d0" in log
        assert "step failed" not in log and "task nodescaler failed" not in log and "Traceback" not in log, log
    finally:
        gateway.stop()


def test_a_node_the_cloud_terminates_is_drained_before_its_lifecycle_action_completes(
        hooked_moto_url: str, redis_url: str, tmp_path: Path) -> None:
    """An operator (or an instance refresh) terminates a worker's instance: the `ember-drain` hook holds
    it in Terminating:Wait; the node scaler marks the node draining, unloads its idle instance, then
    completes the lifecycle action and forgets the node, while the other node is left alone. Requests
    wait for room meanwhile: the node the cloud is taking must not be taken back for them (it was:
    undrained every step, it never drained and the action was never completed)."""
    import redis as redis_lib

    from ember.platform.cluster import DeviceSpec, RedisCluster
    from ember.platform.gateway.protocol import FunctionSpec
    from ember.platform.state import Keys
    from ember.scheduler.view import PlacementRequest
    from tests.platform.conftest import start_gateway

    name, session = _group(hooked_moto_url, hook=True)
    asg = session.client("autoscaling", endpoint_url=hooked_moto_url)
    backend = AwsAutoScalingBackend(name, endpoint_url=hooked_moto_url, session=session)
    backend.set_desired_capacity(2)
    first, second = sorted(backend.instances())
    cluster = RedisCluster(redis_lib.Redis.from_url(redis_url, decode_responses=True), heartbeat_ttl_s=300)
    spec = FunctionSpec(name="kept", checkpoint="ck", nbytes=1 << 20, scaling={"keep_alive_s": 3600})
    cluster.r.hset(Keys.functions, "kept", spec.model_dump_json())  # kept alive: nothing scales in by itself
    placed = {}
    for node, cid in (("t0", first), ("t1", second)):
        cluster.register_node(node, f"http://127.0.0.1:1/{node}", [DeviceSpec("cuda:0", 1 << 30)], {"remote": 1e9},
                              cloud_instance_id=cid)
        inst = cluster.place(PlacementRequest(function="kept", checkpoint="ck", nbytes=1 << 20), _OnNode(node))
        assert inst is not None and inst.node_id == node and cluster.begin_load(inst.instance_id)
        assert cluster.mark_ready(inst.instance_id, "kept")
        placed[node] = inst.instance_id
    gateway = start_gateway(tmp_path, _scaling_gateway_env(redis_url, tmp_path, name, hooked_moto_url,
                                                            EMBER_NODE_MIN="2"))
    try:
        _until(lambda: backend.unprotected() == [] and len(backend.instances()) == 2, gateway)  # steady
        cluster.r.hset(Keys.placements_waiting, "gw-other", f"40 {time.time() + 3600:.3f}")  # room wanted throughout
        asg.terminate_instance_in_auto_scaling_group(InstanceId=first, ShouldDecrementDesiredCapacity=False)
        assert backend.instances()[first] == "Terminating:Wait"
        _until(lambda: first not in backend.instances(), gateway)  # the lifecycle action was completed
        assert "t0" not in cluster.live_nodes() and cluster.instance(placed["t0"]) is None
        assert "t1" in cluster.live_nodes() and "t1" not in cluster.draining_nodes()
        assert cluster.instance(placed["t1"]) is not None
        log = gateway.output()
        assert "taking t0 back" not in log and "terminating t0" in log, log
        assert "step failed" not in log and "Traceback" not in log, log
    finally:
        gateway.stop()


def test_a_fleet_that_just_came_up_is_not_consolidated_before_the_grace(group, moto_url: str, redis_url: str,
                                                                       tmp_path: Path) -> None:
    """Two nodes, each serving a function kept alive, with little memory claimed: consolidation may
    drain one, but only once the node scaler has seen the claims stay low for the scale-in grace. It
    drained one at its first step, 0.3 s after the gateway came up (a fleet deployed at its size
    lost all but one node before any demand reached it)."""
    from ember.platform.state import Keys
    from tests.platform.conftest import start_gateway

    name, session = group
    backend = AwsAutoScalingBackend(name, endpoint_url=moto_url, session=session)
    backend.set_desired_capacity(2)
    cluster, _ = _nodes_serving(backend, redis_url, ("c0", "c1"), "kept", 1 << 20)  # the idle rule leaves them
    gateway = start_gateway(tmp_path, _scaling_gateway_env(redis_url, tmp_path, name, moto_url, EMBER_NODE_GRACE_S="4",
                                                            EMBER_NODE_CONSOLIDATE_BELOW="0.3"))
    try:
        started = time.monotonic()
        _until(lambda: bool(cluster.r.get(Keys.lease("nodescaler"))), gateway, 20)  # the node scaler steps
        while time.monotonic() - started < 2.5:  # steps every 0.3 s: none may drain yet
            assert cluster.draining_nodes() == set(), gateway.output()
            time.sleep(0.1)
        _until(lambda: len(cluster.draining_nodes()) == 1 or len(cluster.live_nodes()) == 1, gateway, 30)
        assert len(cluster.live_nodes()) >= 1
        log = gateway.output()
        assert "draining c" in log and "step failed" not in log and "Traceback" not in log, log
    finally:
        gateway.stop()


def test_a_gateway_that_gets_the_lease_back_after_a_gap_watches_the_fleet_afresh(group, moto_url: str,
                                                                                 redis_url: str, tmp_path: Path) -> None:
    """The node scaler's lease moves to another gateway for longer than the lease and comes back:
    what this gateway saw before the gap is stale (claims were high then, and they fell meanwhile).
    It consolidated at its first step back; now it watches for the grace again first."""
    from ember.platform.state import Keys
    from tests.platform.conftest import start_gateway

    name, session = group
    backend = AwsAutoScalingBackend(name, endpoint_url=moto_url, session=session)
    backend.set_desired_capacity(2)
    cluster, big = _nodes_serving(backend, redis_url, ("g0", "g1"), "big", 600 << 20)
    lease = Keys.lease("nodescaler")
    gateway = start_gateway(tmp_path, _scaling_gateway_env(
        redis_url, tmp_path, name, moto_url, EMBER_NODE_GRACE_S="3", EMBER_NODE_CONSOLIDATE_BELOW="0.3",
        EMBER_NODE_TARGET_MEMORY_UTILIZATION="0.9"))  # 0.59 of the fleet claimed: no rule acts
    try:
        _until(lambda: bool(cluster.r.get(lease)), gateway, 20)
        holder = cluster.r.get(lease)
        time.sleep(4.0)  # watched past the grace
        assert cluster.draining_nodes() == set(), gateway.output()
        cluster.r.set(lease, "gw-elsewhere", px=7000)  # another gateway holds it for 7 s (the lease: 5 s)
        for iid in big:  # meanwhile the claims fall
            cluster.remove_instance(iid)
        _until(lambda: cluster.r.get(lease) == holder, gateway, 30)  # back
        back = time.monotonic()
        while time.monotonic() - back < 2.0:  # watched afresh: nothing drains within the grace
            assert cluster.draining_nodes() == set(), gateway.output()
            time.sleep(0.1)
        _until(lambda: len(cluster.draining_nodes()) >= 1 or len(cluster.live_nodes()) <= 1, gateway, 30)
    finally:
        gateway.stop()


def _nodes_serving(backend: AwsAutoScalingBackend, redis_url: str, nodes: tuple[str, ...], function: str,
                   nbytes: int):  # noqa: ANN202
    """Each of the group's instances registered as one of `nodes` (1 GiB device), serving one ready
    instance of `function` (kept alive for an hour, `nbytes` claimed): (cluster, instance ids)."""
    import redis as redis_lib

    from ember.platform.cluster import DeviceSpec, RedisCluster
    from ember.platform.gateway.protocol import FunctionSpec
    from ember.platform.state import Keys
    from ember.scheduler.view import PlacementRequest

    cluster = RedisCluster(redis_lib.Redis.from_url(redis_url, decode_responses=True), heartbeat_ttl_s=300)
    spec = FunctionSpec(name=function, checkpoint="ck", nbytes=nbytes, scaling={"keep_alive_s": 3600})
    cluster.r.hset(Keys.functions, function, spec.model_dump_json())
    ids = []
    for node, cid in zip(nodes, sorted(backend.instances()), strict=True):
        cluster.register_node(node, f"http://127.0.0.1:1/{node}", [DeviceSpec("cuda:0", 1 << 30)], {"remote": 1e9},
                              cloud_instance_id=cid)
        inst = cluster.place(PlacementRequest(function=function, checkpoint="ck", nbytes=nbytes), _OnNode(node))
        assert inst is not None and cluster.begin_load(inst.instance_id)
        assert cluster.mark_ready(inst.instance_id, function)
        ids.append(inst.instance_id)
    return cluster, ids


class _OnNode:
    """A placement policy that takes the first device with room on one node."""

    name = "on_node"

    def __init__(self, node: str) -> None:
        self.node = node

    def place(self, request, view):  # noqa: ANN001, ANN202
        from ember.scheduler.view import StartupEstimate

        return next(StartupEstimate(d.node_id, d.device_id, "remote", 1.0)
                    for d in view.devices_with_room(request.nbytes, limit=16) if d.node_id == self.node)


def _nodes_gauge(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r'^ember_nodes\{state="([^"]*)"\} ([0-9.e+]+)$', text, re.M)}


def _scaling_gateway_env(redis_url: str, tmp_path: Path, group: str, moto_url: str, **extra: str) -> dict[str, str]:
    """A gateway whose node scaler drives `group` on moto every 0.3 s, with no grace or boot time."""
    from tests.platform.conftest import base_env

    settings = {"EMBER_NODE_BACKEND": "aws", "EMBER_AWS_AUTOSCALING_GROUP": group, "EMBER_AWS_ENDPOINT_URL": moto_url,
                "EMBER_NODE_MIN": "0", "EMBER_NODE_MAX": "4", "EMBER_NODE_GRACE_S": "0", "EMBER_NODE_BOOT_S": "0",
                "EMBER_NODE_SCALER_INTERVAL_S": "0.3", "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    return base_env(redis_url, f"file://{tmp_path / 'store'}", **{**settings, **extra})


def _until(cond, gateway, timeout_s: float = 60.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    pytest.fail("timed out; gateway log:\n" + gateway.output())
