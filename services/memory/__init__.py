"""The memory service: working, episodic and semantic memory and canonical
facts, per tenant, with provenance and erasure of a data subject."""
