"""ASGI entry point: ``uvicorn project.asgi:application`` (the middleware runs in async mode)."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

application = get_asgi_application()
