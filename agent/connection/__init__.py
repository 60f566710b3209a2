"""The MQTT connection: the paho adapter, the session's lifecycle and its network pump, subscriptions, why
a connection ended (ends, classify), keepalive tuning, backoff, the probe connection and the local forwarder."""
