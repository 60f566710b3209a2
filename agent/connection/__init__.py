"""The MQTT connection: paho adapter, session, classification, tuning, backoff and the pure rules
about what may be sent (message size, poison messages)."""
