"""A Django project for the tests of :mod:`idempo.django`: settings, urls, views and a model the views write (the
business's ledger of orders), on a SQLite file or PostgreSQL. ``tests.support.django_setup`` configures it in the
test process; its ``wsgi`` and ``asgi`` modules serve it under gunicorn and uvicorn."""
