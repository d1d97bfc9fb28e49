"""Serving: the continuous-batching scheduler (scheduler.py), SmartSpec (smartspec.py), the OpenAI-compatible
HTTP server (server.py) and the load benchmark (loadtest.py)."""
