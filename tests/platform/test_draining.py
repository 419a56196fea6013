"""A draining node in Redis: placement, the claim script and warm routing skip it; its cloud
instance id is recorded; dropping the node clears the flag, reaping it does not."""

from __future__ import annotations

import time

import redis

from ember.platform.cluster import DeviceSpec, RedisCluster
from ember.platform.state import Keys
from ember.scheduler.view import PlacementRequest, StartupEstimate

GB = 1 << 30


class Pinned:
    """A test policy that always picks one node (as a stale decision would)."""

    name = "pinned"

    def __init__(self, node: str) -> None:
        self.node = node

    def place(self, request, view):
        return StartupEstimate(self.node, "cuda:0", "remote", 1.0)


class FirstFit:
    name = "first_fit"

    def place(self, request, view):
        devices = view.devices_with_room(request.nbytes, limit=16)
        return StartupEstimate(devices[0].node_id, devices[0].device_id, "remote", 1.0) if devices else None


def _cluster(url: str) -> RedisCluster:
    c = RedisCluster(redis.Redis.from_url(url, decode_responses=True), heartbeat_ttl_s=30)
    for n, cloud in (("n1", "i-0001"), ("n2", "i-0002")):
        c.register_node(n, f"http://{n}", [DeviceSpec("cuda:0", 10 * GB)], {"remote": 1e9}, cloud_instance_id=cloud)
        c.heartbeat(n, {})
    return c


def test_draining_node_gets_no_placement_and_no_warm_request(redis_url: str) -> None:
    c = _cluster(redis_url)
    assert c.r.hget(Keys.node("n1"), "cloud_instance_id") == "i-0001"
    warm = c.place(PlacementRequest("f", "ck-f", GB), Pinned("n1"))
    assert warm is not None
    c.mark_ready(warm.instance_id)

    c.set_draining("n1", True)
    assert c.draining_nodes() == {"n1"}
    assert c.place(PlacementRequest("g", "ck-g", GB), Pinned("n1")) is None  # the claim refuses it
    assert {d.node_id for d in c.devices_with_room(GB)} == {"n2"}  # the view hides it
    assert [n.node_id for n in c.all_nodes()] == ["n2"]
    placed = c.place(PlacementRequest("g", "ck-g", GB), FirstFit())
    assert placed is not None and placed.node_id == "n2"
    assert c.acquire_warm("f", 4) is None  # its ready instance takes no new request

    c.set_draining("n1", False)  # taken back (the node scaler's Undrain)
    got = c.acquire_warm("f", 4)
    assert got is not None and got.node_id == "n1"


def test_dropping_a_node_clears_its_draining_flag(redis_url: str) -> None:
    c = _cluster(redis_url)
    c.set_draining("n2", True)
    c.deregister_node("n2")
    assert c.draining_nodes() == set()


def test_a_reaped_node_that_registers_again_stays_draining(redis_url: str) -> None:
    """The gateway reaps a node whose heartbeat lapsed while its worker was alive (paused, cut off
    for a while); the worker registers again under the same id. It used to come back placeable:
    new work went to a node the node scaler was draining. The mark stays until the node scaler
    takes the node back or it is deregistered."""
    c = RedisCluster(redis.Redis.from_url(redis_url, decode_responses=True), heartbeat_ttl_s=0.2)
    c.register_node("n1", "http://n1", [DeviceSpec("cuda:0", 10 * GB)], {"remote": 1e9})
    c.set_draining("n1", True)
    time.sleep(0.3)
    assert c.reap_dead_nodes() == ["n1"]
    assert not c.heartbeat("n1", {})  # the worker's next beat: unknown, it registers again
    c.register_node("n1", "http://n1", [DeviceSpec("cuda:0", 10 * GB)], {"remote": 1e9})
    assert c.heartbeat("n1", {})
    assert c.draining_nodes() == {"n1"}
    assert c.place(PlacementRequest("g", "ck-g", GB), Pinned("n1")) is None  # the claim refuses it
    assert c.all_nodes() == [] and c.devices_with_room(GB) == []  # the view hides it
    c.set_draining("n1", False)  # the node scaler's Undrain
    assert c.place(PlacementRequest("g", "ck-g", GB), Pinned("n1")) is not None
