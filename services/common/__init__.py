"""The one runtime every AIOS mesh service shares: Kafka I/O with Avro, gRPC
bootstrap, settings, logging, tracing, metrics and health. Services import
this package and the generated contracts, never each other."""
