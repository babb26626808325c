"""Actors of a CLPD run: plain classes, made remote only by :mod:`clpd_ray.runtime.actors.launcher`."""
