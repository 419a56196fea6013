"""Every Redis key Ember uses, in one place. All keys start with `ember:`.

Durable (persisted with AOF): function specs, API keys, energy budgets.
Ephemeral (rebuilt by workers after a Redis restart): nodes, heartbeats, instances, claims, leases.

Sections are owned by the module that reads and writes them; add keys here, not inline.
"""

from __future__ import annotations

PREFIX = "ember:"


class Keys:
    """Key builders. Names are validated before they get here (see ember.platform.names)."""

    # --- functions and API keys (platform: gateway/registry.py, gateway/auth.py) --------
    functions = PREFIX + "functions"  # hash: name -> FunctionSpec JSON

    @staticmethod
    def api_key(key_hash: str) -> str:  # hash: id, role, name, owner, created, rpm, tpm (limits; absent: defaults)
        return f"{PREFIX}apikey:{key_hash}"

    api_key_ids = PREFIX + "apikeys"  # hash: id -> key_hash

    # --- tenancy (platform: gateway/checkpoints.py) -------------------------------------
    allowed_stores = PREFIX + "stores:allowed"  # set of canonical store URIs an admin allowed
    checkpoint_grants = PREFIX + "checkpoint:grants"  # hash: "STORE/NAME" -> {"owner", "shared"} JSON

    # --- per-key rate limits (platform: gateway/ratelimit.py) ---------------------------
    @staticmethod
    def key_limits(key_id: str) -> str:  # legacy hash: rpm, tpm (now fields of the key's api_key hash)
        return f"{PREFIX}limits:{key_id}"

    @staticmethod
    def rate_window(key_id: str, kind: str) -> str:  # sorted set: member "ts:rand:n", score = ms
        return f"{PREFIX}rate:{key_id}:{kind}"

    # --- cluster (platform/cluster.py: nodes, devices, instances, claims, leases) --------
    nodes = PREFIX + "nodes"  # set of node ids that registered

    @staticmethod
    def node(node_id: str) -> str:  # hash: url, devices JSON, bandwidths JSON
        return f"{PREFIX}node:{node_id}"

    @staticmethod
    def node_alive(node_id: str) -> str:  # string with TTL: the heartbeat
        return f"{PREFIX}node:{node_id}:alive"

    @staticmethod
    def node_holdings(node_id: str) -> str:  # hash: checkpoint -> tier
        return f"{PREFIX}node:{node_id}:holdings"

    @staticmethod
    def holders(checkpoint: str) -> str:  # set of node ids holding the checkpoint locally
        return f"{PREFIX}holders:{checkpoint}"

    @staticmethod
    def prefetching(checkpoint: str) -> str:  # sorted set: node id -> when its prefetch stops counting as in flight (s)
        return f"{PREFIX}prefetching:{checkpoint}"

    @staticmethod
    def device(node_id: str, device_id: str) -> str:  # hash: memory_bytes, claimed_bytes, instances
        return f"{PREFIX}device:{node_id}/{device_id}"

    @staticmethod
    def instance(instance_id: str) -> str:  # hash: function, node, device, state, outstanding, ...
        return f"{PREFIX}instance:{instance_id}"

    @staticmethod
    def instance_slots(instance_id: str) -> str:  # sorted set: request slot id -> lease expiry (s)
        return f"{PREFIX}instance:{instance_id}:slots"

    instances = PREFIX + "instances"  # set of instance ids

    @staticmethod
    def wake(function: str) -> str:  # pub/sub channel: a slot freed / an instance became ready
        return f"{PREFIX}wake:{function}"

    wake_pattern = PREFIX + "wake:*"

    @staticmethod
    def waiting(function: str) -> str:  # string with a TTL: some gateway has requests of it waiting
        return f"{PREFIX}waiting:{function}"

    @staticmethod
    def function_instances(function: str) -> str:  # set of instance ids of a function
        return f"{PREFIX}function:{function}:instances"

    @staticmethod
    def node_instances(node_id: str) -> str:  # set of instance ids placed on the node
        return f"{PREFIX}node:{node_id}:instances"

    devices_free = PREFIX + "devices:free"  # sorted set: "node/device" scored by free bytes

    @staticmethod
    def lease(name: str) -> str:  # string holder with TTL (autoscaler, energy allocator)
        return f"{PREFIX}lease:{name}"

    # --- fleet (platform/fleet.py, gateway/nodescaling.py: the node scaler) ----------------
    # set of node ids: nothing new is placed there. Kept when a node is reaped (its worker may come
    # back under the same id), forgotten when it is deregistered or taken back
    nodes_draining = PREFIX + "nodes:draining"
    placements_waiting = PREFIX + "placements:waiting"  # hash: gateway id -> "count timestamp"
    placements_waited_total = PREFIX + "placements:waited_total"  # counter: requests that waited for room
    # hash: active/draining/booting node counts of the node scaler's last step (expires with its lease)
    fleet_counts = PREFIX + "fleet:counts"
    # a node's cloud instance id is the field `cloud_instance_id` of Keys.node(node_id)

    # --- energy (platform/energy_state.py) -------------------------------------------------
    energy_budget = PREFIX + "energy:budget"  # JSON: cluster_watts, node_watts, energy_kwh_per_day

    @staticmethod
    def energy_device(node_id: str, device_id: str) -> str:  # hash with TTL: latest device snapshot
        return f"{PREFIX}energy:device:{node_id}/{device_id}"

    energy_devices = PREFIX + "energy:devices"  # set of "node/device"
    energy_caps = PREFIX + "energy:caps"  # hash: "node/device" -> power cap in watts (allocator)
    energy_allocation = PREFIX + "energy:allocation"  # JSON: latest allocation (caps, needs, misses)

    @staticmethod
    def energy_day_last(day: str) -> str:  # hash with TTL: "node/device" -> last energy_j counter read on `day`
        return f"{PREFIX}energy:daylast:{day}"

    @staticmethod
    def energy_day_used(day: str) -> str:  # hash with TTL: "node/device" -> joules drawn on `day` (only grows)
        return f"{PREFIX}energy:dayused:{day}"
