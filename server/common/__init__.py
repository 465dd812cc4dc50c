"""What every layer shares and nothing else: domain errors, structured logs, strict JSON text,
problem details and request ids, and the node's lifecycle state. Imports nothing from the rest
of `server`."""
