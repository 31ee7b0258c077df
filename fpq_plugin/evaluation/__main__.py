"""``python -m fpq_plugin.evaluation`` is ``fpq eval``."""

from fpq_plugin.evaluation.command import main

raise SystemExit(main())
