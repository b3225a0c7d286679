"""The fleet tests' etcd: the launcher lives in the package (``manager.etcd_lab``), since the fleet lab needs it."""

from manager.etcd_lab import CLIENT_PORT, PEER_PORT, Etcd, etcd_skip_reason, in_netns, trio_in_netns

__all__ = ["CLIENT_PORT", "PEER_PORT", "Etcd", "etcd_skip_reason", "in_netns", "trio_in_netns"]
