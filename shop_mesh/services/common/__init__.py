"""Shared runtime of the shop services: bootstrap, health, errors, config, logging, database."""
