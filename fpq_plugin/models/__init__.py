"""Model architectures and tiny test pipelines built from configs, without the model hub."""
