"""stylecast benchmarks: standalone timing scripts for backends and the server."""
