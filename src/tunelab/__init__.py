"""tunelab: a fine-tuning laboratory for language models."""

from tunelab.core.deferred import defer_bitsandbytes

__version__ = "0.1.0"

defer_bitsandbytes()  # `import peft` without importing bitsandbytes (seconds, and a log line): core/deferred.py
