"""A Kubernetes-like cluster in network namespaces: the dataplane of quickstart and e2e tests."""
