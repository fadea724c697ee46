"""`python -m llm2vec_mini ...`: see cli.py."""
from .cli import main

raise SystemExit(main())
