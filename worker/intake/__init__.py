"""What comes in: manifests, the disks they list (loose VMDK files, or the disks of VMware
OVF directories and OVA archives), inspected and read, and the checks against the cloud
before a job runs."""
