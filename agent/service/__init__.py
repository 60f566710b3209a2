"""The service edge: wiring, systemd notification, health, metrics, logs, reload, and the local API
(telemetry and events from the gateway's own apps)."""
