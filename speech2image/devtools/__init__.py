"""Developer tools: offline fixtures and helpers, never imported by the running service."""
