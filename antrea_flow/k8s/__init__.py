"""Kubernetes metadata: stores of Nodes, Pods, Services, NetworkPolicy rules; their sources."""
