"""preftune: tune language models to human preferences.

The layout is the architecture (docs/architecture.md): shared layers (``data``, ``models``,
``scoring``, ``training``) below one package per stage (``sft``, ``sampling``, ``annotators``,
``reward``, ``ppo``, ``dpo``, ``evaluation``, ``feedback``), the main job (``pipeline``) on top,
and the command line (``cli``). Imports flow downwards only.
"""

__version__ = "0.1.0"
