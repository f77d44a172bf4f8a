"""Clients of the cloud's HTTP APIs: Keystone for tokens and the catalog, Glance for images."""
