"""Client certificate renewal: a new key made on the device, its CSR signed by the configured signer,
the certificate checked (agent/certcheck.py) and proven with a probe CONNECT before the session
switches to it, with the previous pair kept as the fallback.

    policy.py    pure: when to renew (lifetime share, before-expiry, per-device offset), retry backoff
    store.py     the pending / active / previous pairs under agent.state_dir/tls, and the state file
    signer.py    the exec signer (CSR on stdin, chain on stdout; no shell, timeout, clean environment)
    rollover.py  the state machine: sign, check, probe, switch, watch, roll back; the renewal thread
    handlers.py  the built-in commands cert.csr and cert.install (signer = "command")
"""
