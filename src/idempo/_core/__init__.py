"""The sans-I/O core of idempo: standard library only, no ASGI, no backend, no clock, no event loop."""
