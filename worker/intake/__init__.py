"""What comes in: manifests, the disks they list (inspected and read), and the checks
against the cloud before a job runs."""
