"""The HTTP contract for blocking faces (WSGI, Django, Flask): one keyed request's store conversation and its
response's capture, written once over the decision table and a :class:`~idempo.SyncStore`. Strictly private."""
