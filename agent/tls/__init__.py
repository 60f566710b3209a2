"""TLS for the MQTT connection: the SSL context (context), reading certificates (certs), TLS failures in
words (explain), and the one chain checker for enroll, renewal and doctor (check).
"""
