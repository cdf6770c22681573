"""gannet: train GANs at cluster scale.

The import namespace of the project. Its parts live at the top of the source tree and install
under this one name (pyproject.toml maps each folder): `gannet.trainer` (the engine: config, data,
distributed engine, loop, checkpoints, tracking, evaluation, bench, CLI), `gannet.models`
(networks and GAN recipes), `gannet.launch` (Accelerate/DeepSpeed presets, Slurm) and
`gannet.configs` (the bundled experiment configs). One name in site-packages, so another
`models` or `trainer` package in a research environment neither shadows gannet nor is shadowed.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gannet")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
