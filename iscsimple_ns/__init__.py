"""iscsimple: Xen block hotplug for mirrored iSCSI disks, and its Prometheus agent."""

__version__ = "0.1.0"
