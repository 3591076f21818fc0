"""testbed: kube-proxy's dataplanes on an emulated multi-node cluster of network namespaces."""

__version__ = "0.1.0"
