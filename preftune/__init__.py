"""preftune: tune language models to human preferences.

Stages, one subpackage each: ``data`` (formats), ``models`` (loading, generation),
``sft``, ``reward``, ``ppo``, ``feedback`` (annotation app and simulated annotators),
``evaluation``, and ``cli``.
"""

__version__ = "0.1.0"
