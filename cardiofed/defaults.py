"""Defaults both services and the command line share, without importing either service."""

DEFAULT_DATABASE_URL = "sqlite:///cardiofed-coordinator.db"
