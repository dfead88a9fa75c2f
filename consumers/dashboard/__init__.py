"""The live dashboard: an ASGI app (Starlette under uvicorn) over the read model, pushed to browsers with
Server-Sent Events after the projections commit (PostgreSQL LISTEN/NOTIFY). It only reads."""
