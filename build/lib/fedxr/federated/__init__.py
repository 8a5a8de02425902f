"""Federated training with NVIDIA FLARE: the client script, the job builder and the run outputs."""
