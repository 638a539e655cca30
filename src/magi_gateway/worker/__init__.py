"""Agent workers: the SDK agents are written against, the runner that serves them from
Redis, group commit of their thinking chunks, and the bridge to the original backends."""

__all__: list[str] = []
