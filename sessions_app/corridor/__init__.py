"""What every request walks, in the order it walks it: request id, errors, auth, limits,
idempotency, ETags and the response helpers. A module here imports only those before it."""
