"""Generated gRPC stubs for convray's own API (built from classifier.proto by ``make proto``)."""
