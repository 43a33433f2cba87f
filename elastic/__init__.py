"""raydistro's elastic trainer: coordinator and worker actors, membership, checkpoints, model, CLI."""
