"""
A small-scale, rerunnable study of CLTS and MDLRC (Xu et al., 2024) on CIFAR-10.

Each arm (``ARMS``: the baseline, the CLTS sigma grid, Fig. 6(a) modules, Fig. 6(b) mu and 6(c)
target-iteration ablations at ``BEST_SIGMA``, and the Table 2-3 comparisons Min-SNR, P2, SpeeD,
loss-second-moment and FDM) is a normal training run that differs from the baseline only by its
flags, trained with several seeds from the same data and evaluated by FID and KID against CIFAR-10
training images at every checkpoint (``scripts/fid_curve.py``, offline Inception), with a
held-out denoising-loss probe at fixed timesteps. ``GROUPS`` names sets of arms for ``--arms``;
``SCALES`` holds the presets (``cpu``: 2,000 steps; ``cpu_long``: 10,000; ``gpu``; ``test``).

Everything goes to one folder (``--out``): ``data/`` (the prepared training, reference and held-out
images), ``runs/<arm>-s<seed>/`` (a normal training run folder: config.yaml, progress.csv,
checkpoints, fid_curve.csv, probe.csv), ``cache/`` (reference Inception features) and
``timing.json``. Finished runs' small files are copied to the committed ledger
(``docs/study/ledger/<scale>/<run>/``), from which the summary, the claims table, docs/study.md's
generated sections (``DOC_PARTS``) and the figures are computed, after the ledger is checked
(``check_ledger``: a damaged or incomplete run folder stops it before anything is rewritten).

Resumable: a run in the ledger is not run again, a finished run in ``--out`` is not trained
again, an interrupted one resumes from its newest complete checkpoint (``--resume auto``), and
``fid_curve.py`` skips checkpoints already in its CSV. Rerunning after completion only reprints the summary.

The package, one concern per module (each imports only the ones listed after it):

- ``runner``: training and evaluating runs, committing them, the bootstrap, the ``--out`` lock;
- ``report``: the per-arm and claims tables, docs/study.md's generated sections;
- ``plots``: the figures;
- ``stats``: iterations to a FID, paired differences, pooled seed noise, the verdicts' rules;
- ``ledger``: reading a run folder's files, the committed ledger and its check;
- ``evaluation``: the FID settings, the held-out probe, the paired bootstrap;
- ``data``: CIFAR-10 at the study's resolution, the held-out images;
- ``errors``: the one-line errors (``config.run_script`` reports them), the write guard;
- ``arms``: the arms, groups and scales, a run's training flags.

This module re-exports their public names: ``from experiments import study; study.ARMS``.
"""
from experiments.study.arms import ARM_CLAIMS, ARM_NAMES, ARMS, BEST_ARM, BEST_SIGMA, GPU_SHORT_ARM, GROUP_FIGURES, \
    GROUPS, HEADLINE, ROOT, SCALES, SCRIPTS, Arm, Scale, ablation_value, arm_flags, arms_named, clts_arm, \
    flags_to_argv, keeps_samples, preset, run_name
from experiments.study.data import DEFAULT_SOURCES, PROBE_IMAGES, heldout_source, prepare_data, prepare_heldout
from experiments.study.errors import SPACE_ERRNOS, LedgerError, StudyError, StudyLocked, StudyStepFailed, \
    StudyWriteError, run_step, writing
from experiments.study.evaluation import BOOTSTRAP_DRAWS, BOOTSTRAP_SEED, PROBE_FRACTIONS, PROBE_SEED, \
    SECOND_SAMPLER, PairedBootstrap, fid_flags, probe_checkpoint, probe_run, probe_timesteps, reference_statistics, \
    sample_features, sampler_key, second_sampler, warm_reference
from experiments.study.ledger import BOOTSTRAP_FILE, DEFAULT_LEDGER, DONE_FILE, LEDGER_FILES, SAMPLES_FILE, \
    check_ledger, commit_to_ledger, committed_seeds, csv_records, curve_records, final_fid, final_samples, in_ledger, \
    gradient_norm_spread, ledger_dir, ledger_problems, missing_points, probe_rows, read_bootstrap, read_curve, \
    run_finished, run_folder_problems, training_clock_s
from experiments.study.stats import VERDICT_ALPHA, bootstrap_interval, iterations_to_reach, mean_sd, mean_speedup, \
    speedup, paired_differences, paired_lead, paired_noise, probe_relative, seed_band, seed_diffs, verdict
from experiments.study.plots import ABLATION_PANELS, plot_ablations, plot_curves, plot_probe, plot_speedup
from experiments.study.report import DECISION_SCALE, DOC_PARTS, PAGE_SCALES, SECOND_SEED_SUFFIX, SECOND_SEED_TOP, \
    claims_table, decide_fastest, doc_markers, doc_sections, resolve_arms, second_seed_arms, speedup_markdown, \
    speedup_table, summarize, write_doc_section
from experiments.study.runner import LOCK_FILE, StudyLock, backfill_samples, backfill_second_sampler, \
    bootstrap_arms, bootstrap_study, export_results, run_bootstrap, run_study, train_and_evaluate

__all__ = ["Arm", "Scale", "ARMS", "SCALES", "arm_flags", "run_name", "prepare_data", "run_study",
           "summarize", "iterations_to_reach", "export_results", "PairedBootstrap", "bootstrap_study",
           "bootstrap_interval", "backfill_samples", "seed_band", "GROUP_FIGURES", "verdict",
           "paired_noise", "paired_lead", "VERDICT_ALPHA", "check_ledger", "LedgerError", "StudyLocked",
           "StudyWriteError"]
