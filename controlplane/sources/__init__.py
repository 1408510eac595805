"""Config sources feeding the `ConfigStore`: a manifest directory and the Kubernetes API."""
