"""The example's routes."""

from django.urls import path

from . import views

urlpatterns = [
    path("health", views.health),
    path("recommendations", views.recommendations),
    path("admin/rollback", views.rollback),
]
