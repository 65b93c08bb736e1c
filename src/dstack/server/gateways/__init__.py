"""Gateways: standalone proxy processes (`python -m dstack.proxy.gateway`) that publish services
at `<run>.<domain>` and the OpenAI-compatible model endpoint at `gateway.<domain>`.

- `models.GatewayModel` — one row per gateway (per project, unique name).
- `manager.GatewayManager` — starts the gateway process on this host (detached, so it outlives
  the server; a healthy one is reused at start, a dead one restarted), and is a ServiceManager
  publisher: every service/replica change of a project is pushed to the project's gateways.
- `router` — `/api/project/{p}/gateways/{create,list,get,delete,set_default}` for users, and
  `/api/proxy/{authorize,wake}` that gateways call with their own token.
- `urls` — which gateway a service run uses, and its public URLs.
"""
