"""The observability domain: audit entries, what records mean for metrics, and
query rules. Pure: no Kafka, gRPC or Redis here."""
