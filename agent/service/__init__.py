"""The service edge: wiring, systemd notification, health, metrics, logs, reload."""
