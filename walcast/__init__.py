"""walcast: every committed PostgreSQL write as a live, access-controlled WebSocket event.

`mint_ticket(secret, user_id=..., organization_id=..., roles=[...])` signs a WebSocket ticket
with `ACCESS_TOKEN`, for applications that hand out tickets themselves. The client
lives in `walcast.client` (`RealtimeClient`, `Realtime`).
"""

from gateway.tickets import mint_ticket

__all__ = ["mint_ticket"]
