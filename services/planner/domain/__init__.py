"""The planner's pure logic: workflow definitions, the expression language and
the run state machine. No Kafka, gRPC, Redis or Ray in here."""
