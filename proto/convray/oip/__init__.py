"""Generated stubs for the Open Inference Protocol service (built from inference.proto by ``make proto``)."""
