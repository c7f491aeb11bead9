"""Recipes ship in the package as `essa.recipes`, so `essa align` finds the quickstart in any install."""
