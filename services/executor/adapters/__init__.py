"""The executor's adapters: Redis stores (leases, claims), HTTP connectors, the
memory gRPC client, the reply generator, the tool runner and the Kafka wire
converters (``wire``: the one module that knows the StepRequest/StepResult records)."""
