"""Sources that are more than one disk file: VMware OVF directories and OVA archives."""
