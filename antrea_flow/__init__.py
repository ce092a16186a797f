"""antrea-flow: network flow visibility for Kubernetes, compatible with Antrea's flow exporter."""

__version__ = "0.1.0"
