"""Placement: startup-time estimator, policies, autoscaler and a trace-driven simulator.

Policies see a `ClusterView` (view.py); the platform implements it over Redis and the simulator
in memory, so both run the same policy objects.
"""
