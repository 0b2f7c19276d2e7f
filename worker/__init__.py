"""The volunteer worker: joins a coordinator, trains leased shards with the shared trainer, and
averages its pseudo-gradient with the swarm at the end of each round."""
