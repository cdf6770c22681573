"""Configs: the typed sections (schema, a leaf module) and loading YAML + `key=value` overrides into them (loader)."""
