"""GPU benchmarks of lightning_memopt against the peer implementations (see benchmarks/README.md)."""
