"""Recipes shipped with jaxquant (installed as the package data of ``jaxquant.recipes``)."""
