"""gRPC services, one module each, and the one error map (`status`)."""
