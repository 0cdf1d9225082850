"""Configuration: dataclasses for every option, YAML in, validated, unknown keys refused.

* :mod:`.sections` - one dataclass per section (data, model, unet, dit, mlp, diffwave, diffusion, train,
  autoencoder, distill, text), defaults equal to the papers' values (Ho et al. 2020 for the UNet);
* :mod:`.load` - YAML files and ``key=value`` overrides in (earlier spellings read with a note),
  YAML out, :func:`describe_config` for ``ddpm train --print-config``;
* :mod:`.validate` - checks that never change the config, each error naming the key (:mod:`.audio`: those of
  sound data and DiffWave, with DiffWave's presets).

The valid choices of the diffusion keys are those of the modules that implement them
(:mod:`ddpmlab.diffusion`).
"""

from ddpmlab.config.audio import DIFFWAVE_PRESETS, diffwave_settings
from ddpmlab.config.load import (
    config_from_dict,
    describe_config,
    format_config,
    load_config,
    parse_value,
    resolve_config_path,
    save_config,
)
from ddpmlab.config.sections import (
    BUNDLED_DIR,
    CONDITIONS,
    CONFIG_VERSION,
    DATASETS,
    DISTILL_METHODS,
    DOWNSAMPLE_MODES,
    ODE_SOLVERS,
    RENAMED_KEYS,
    SECTIONS,
    STAGES,
    STUDENT_PREDICTIONS,
    UPSAMPLE_MODES,
    AutoencoderConfig,
    Config,
    DataConfig,
    DiffusionConfig,
    DiffWaveConfig,
    DistillConfig,
    DiTConfig,
    MLPConfig,
    ModelConfig,
    TextConfig,
    TrainConfig,
    UNetConfig,
)
from ddpmlab.config.validate import DIT_PRESETS, DIT_SIZES, dit_settings, validate

__all__ = [
    "AutoencoderConfig", "BUNDLED_DIR", "CONDITIONS", "CONFIG_VERSION", "Config", "DATASETS", "DIFFWAVE_PRESETS",
    "DIT_PRESETS", "DIT_SIZES", "DISTILL_METHODS", "DOWNSAMPLE_MODES", "DataConfig", "DiTConfig", "DiffusionConfig",
    "DiffWaveConfig", "diffwave_settings",
    "DistillConfig", "MLPConfig", "ModelConfig", "ODE_SOLVERS", "RENAMED_KEYS", "SECTIONS", "STAGES",
    "STUDENT_PREDICTIONS", "TextConfig", "TrainConfig", "UNetConfig", "UPSAMPLE_MODES", "config_from_dict",
    "describe_config", "dit_settings", "format_config", "load_config", "parse_value", "resolve_config_path",
    "save_config", "validate",
]
