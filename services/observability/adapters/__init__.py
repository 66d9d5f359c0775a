"""Adapters of the observability service: the Redis audit store and the gRPC AuditService."""
