"""Everything the agent must not lose, in one durable store (agent.state_dir/state.sqlite3).

`store` owns the file (schema, migration from earlier versions, size bound, recovery from a sick disk),
`writer` the group commit (one fsync per batch, then the acknowledgements in order), `outbox` the
send window between the stored outbound queue and the MQTT client.
"""
