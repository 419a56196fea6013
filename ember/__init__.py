"""Ember: serverless LLM functions with fast cold starts and SLO-aware GPU energy control."""

__version__ = "0.1.0"
