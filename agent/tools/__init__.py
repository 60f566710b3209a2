"""Operator tools run from the command line next to the service (doctor, enroll, send, renew, publish)."""
