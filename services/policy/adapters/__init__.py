"""Adapters of the policy service: policy files, Redis budgets, audit publishing, gRPC."""
