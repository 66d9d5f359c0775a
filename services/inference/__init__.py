"""Inference service: a Ray Serve application with two tiers of the same model
(low-latency and high-throughput) behind a router, the intent classifier fitted
on BANKING77, and a small HTTP client for the other services."""
