"""The coordinator: shard leases, the SQLite ledger, the gRPC control plane, the round loop that
aggregates workers' pseudo-gradients through hivemind, and checkpoints of theta_global."""
