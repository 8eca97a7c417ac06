"""Settings: no database, no auth apps; ``CanaryMiddleware`` configured by ``CANARY_ROUTER``.

The user id comes from the ``x-user-id`` header, believed only from the trusted proxy (127.0.0.1). With
``django.contrib.auth`` installed, put ``AuthenticationMiddleware`` before ``CanaryMiddleware`` and the
signed-in user's primary key is used instead. Override tokens, pins and signed user cookies are signed with
``$CANARY_ROUTER_SECRET``.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or secrets.token_urlsafe(50)
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]

INSTALLED_APPS: list[str] = []
DATABASES: dict[str, dict[str, str]] = {}

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "canary_router.django.CanaryMiddleware",
]

ROOT_URLCONF = "project.urls"
WSGI_APPLICATION = "project.wsgi.application"
USE_TZ = True

CANARY_ROUTER = {
    "config": BASE_DIR / "canary.toml",
    "trusted_proxies": ["127.0.0.1"],
    "user_header": "x-user-id",
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"canary_router": {"handlers": ["console"], "level": "INFO"}},
}
