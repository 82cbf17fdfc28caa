"""Command composition and the supervisor (queue claims, spawn, kill, retries, log pump)."""
