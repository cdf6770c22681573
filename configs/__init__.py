"""gannet's bundled experiment configs (`gannet train lsgan_mnist` reads lsgan_mnist.yaml here).

A package, not a bare folder, so that the YAML files install with gannet as package data and are
found through the import system (importlib.resources): the same lookup works in a source
checkout, an editable install and an installed wheel, whatever the working directory.
"""
