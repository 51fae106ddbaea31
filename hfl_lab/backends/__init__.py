"""Backends: where the lab's participants run (local processes, or pods on Kubernetes)."""
