"""Tenants and what is theirs: API keys, quotas, idempotency keys."""
