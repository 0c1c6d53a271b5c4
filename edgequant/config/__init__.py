"""The YAML configuration of ``edgequant quantize`` and ``edgequant compare``.

A config names a model, its data and what to try; the code behind each name is imported only
when it is used (``Config.build_model()``, ``Config.calib_batches()``, ...), so a config is
validated in milliseconds and a typo is reported with its file and line before anything runs::

    model: edgequant.examples.mnist1d:trained_cnn        # "package.module:function" -> nn.Module
    calib_data: edgequant.examples.mnist1d:calib_batches # -> iterable of model inputs
    eval_data: edgequant.examples.mnist1d:eval_batches   # -> iterable of (inputs, labels)
    recipes: [w8a8, w4a8]

A factory is either that string or a mapping ``{function: "module:function", kwargs: {...}}``.
Modules are imported with the config file's folder first on ``sys.path``, so a data module can
live next to the config; relative file paths resolve against that folder too. See
``examples/*.yaml`` for every key, documented.
"""

from edgequant.config.reader import load_config
from edgequant.config.schema import KEYS, METRICS, Config, ConfigError, Factory

__all__ = ["KEYS", "METRICS", "Config", "ConfigError", "Factory", "load_config"]
