"""The operator's side: the `vmdk-migrate` commands, reports, the dashboard and the demo."""
