"""`python -m trainer ...` is `gannet ...`, so `accelerate launch -m trainer train ...` works."""

from trainer.cli import main

raise SystemExit(main())
