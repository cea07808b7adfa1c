"""The OpenAI-compatible front over many instances: policies, health, P/D orchestration, migration."""
