"""stylecast contracts, torch-free: the gRPC API (.proto files, compiled at build time), the bundle manifest schema and
its validator with the golden tolerances a bundle records (protos.manifest, standard library and common only)."""
