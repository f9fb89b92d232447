"""A Django REST framework API behind ``idempo.django.IdempotencyMiddleware`` (docs/django.md): orders created by a
``ViewSet`` and payments by an ``APIView``, each keyed POST run once. ``python -m examples.django_drf.check`` runs
it against a scratch database and prints what it saw."""
