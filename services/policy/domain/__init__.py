"""The policy domain: parsed policy files, rule evaluation, PII masking and
budget arithmetic. Pure: no Kafka, gRPC or Redis here."""
