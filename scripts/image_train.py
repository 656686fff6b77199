"""
Train a diffusion model on images.

Upstream's ``scripts/image_train.py`` flow (one defaults dict -> argparse flags), plus
``--config FILE.yaml`` (command-line flags override the file), the paper's CLTS sampler and
MDLRC schedule, loss weightings, mixed precision, exact resume and a run folder with the
resolved configuration, checkpoints, logs and sample grids.

    python scripts/image_train.py --config configs/cifar10/clts_mdlrc.yaml
    mpiexec -n 8 python scripts/image_train.py --config configs/imagenet128/baseline.yaml
    python scripts/image_train.py --config configs/smoke/tiny.yaml --log_dir runs/try
"""
from __future__ import annotations

from typing import Optional, Sequence


from guided_diffusion.training import (  # noqa: E402,F401  (the names this script offered, kept)
    config_yaml,
    create_argparser_defaults,
    create_schedule,
    parse_args,
    resolve_log_dir,
    resolved_config,
    train,
    train_loop_kwargs,
)
from guided_diffusion.training import load_training_data as _load_data  # noqa: E402,F401

DESCRIPTION = " ".join(__doc__.split("\n\n")[0].split())


def main(argv: Optional[Sequence[str]] = None) -> str:
    """Train as the flags say (``guided_diffusion.training.train``); returns the run folder."""
    return train(argv, DESCRIPTION)


if __name__ == "__main__":
    from guided_diffusion.run_folder import RunFolderError
    from guided_diffusion.script_util import run_script
    from guided_diffusion.train_util import NonFiniteLossError

    run_script(main, failures=(NonFiniteLossError, RunFolderError))
