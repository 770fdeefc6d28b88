"""`python -m seckill` is `seckill`."""

from seckill.cli import main

raise SystemExit(main())
