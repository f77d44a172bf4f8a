"""vmdk-migrate: bulk migration of VMware VMDK disks into OpenStack Glance images."""

__version__ = "0.1.0"
