"""stylecast contracts: the gRPC API (.proto files, compiled at build time) and the bundle manifest schema."""
