"""Observability service: the audit trail, run timelines and the mesh-wide Prometheus metrics."""
