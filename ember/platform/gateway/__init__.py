"""The gateway: OpenAI-compatible routes, function registry, auth, admin, autoscaler host."""
