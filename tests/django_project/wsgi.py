"""The test project as a WSGI application, for gunicorn: ``tests.django_project.wsgi:application``."""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.django_project.settings")
application = get_wsgi_application()
