"""The worker (node agent): owns devices and checkpoint tiers, runs instances, heartbeats."""
