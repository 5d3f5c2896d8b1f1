"""Synthetic catalogue renders (coloured drawings of product kinds) for the demo, the tests and the training of
the bundled test model."""

from imagesearch.synthetic.renderer import CatalogueItem, make_catalogue, render

__all__ = ["CatalogueItem", "make_catalogue", "render"]
