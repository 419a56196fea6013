"""The HTTP function platform: gateway, worker, runtime and the Redis state schema."""
