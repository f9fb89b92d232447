"""The ASGI middleware's private parts: the ASGI types, the default principal, the exchange of one keyed request,
lease renewal and start-up checks. :mod:`idempo.asgi` is the public way in."""
