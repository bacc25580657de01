"""The HTTP routes, one APIRouter per area: search, images, admin, ops, and the web page.

Each module's `router(settings, ...)` builds its router for one app: query limits (k), defaults
and the API-key dependencies come from the settings. service/app.py includes them in this order.
"""
