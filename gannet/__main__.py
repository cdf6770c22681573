"""`python -m gannet ...` is `gannet ...`: `accelerate launch -m gannet train ...`, `torchrun -m gannet ...`."""

from gannet.trainer.cli import main

raise SystemExit(main())
