"""
The consistency phenomenon, measured (issue #19): the paper's Table 1 and Figs. 1-4 from models
trained here, at the CPU study's scale (CIFAR-10 16x16, the study's ``cpu`` U-Net, 2,000 steps).

Models (run folders ``<arm>-s<seed>``, trained with ``experiments.study.arm_flags``):

    baseline-s1, baseline-s2   epsilon-prediction, two initialisations: the CPU study's own runs
                               (taken from ``--study_out``/runs when finished there with the same
                               flags, else trained here with exactly the study's flags)
    deep-s3                    epsilon-prediction, another architecture (2 res blocks per level)
    x0_pred-s1, x0_pred-s2     x0-prediction, two initialisations (the paper's counter-example)
    dcgan-s1, dcgan-s2         DCGAN (``scripts/baselines/dcgan_train.py``), two initialisations,
                               on the same 16x16 training images

Analyses (each calls the repository's analysis scripts or ``experiments.analysis``; nothing
is re-implemented here):

    table1/   Table 1 / Fig. 1: ``scripts/consistency.py`` per group of models and checkpoint:
              the uint8 samples (the same x_T and per-step noise for every model) are the
              ledger; the PSNRs (Eq. 1, pooled, and the per-image mean) are recomputed from them
    fig2/     Fig. 2: the predicted x0 along one sampling chain per model (shared noise,
              ``analysis.predicted_xstart_trajectory``) for two initialisations, and the per-t
              PSNR between the two models' predictions
    fig3/     Fig. 3: ``scripts/hessian_spectrum.py`` on the diffusion loss and on the DCGAN
              generator loss; compared after dividing the eigenvalues by the loss value
    fig4/     Fig. 4: ``scripts/loss_landscape.py`` between one run's raw checkpoints after a
              short and a long stretch of training, diffusion and DCGAN

Everything heavy goes to ``--out`` (runs/figures-cpu: ``runs/``, ``logs/``, ``analysis/``); the
small result files go to the ledger (docs/figures/, committed). A task whose ledger files exist
is never recomputed, a model is trained only when a missing task needs it, and the tables, the
figures and docs/figures.md's generated section are rebuilt from the ledger alone, so a fresh
clone reprints everything without a checkpoint.

The package, one concern per module (each imports only the ones listed after it):

- ``runner``: where each model lives, training it, the analyses' runners, ``run_figures``;
- ``reporting``: ``report``, table1.csv, summary.json, the printed verdicts, docs/figures.md's section;
- ``plots``: the figures' PNGs;
- ``summaries``: Table 1's PSNRs and rows, the Figs. 2-4 summaries, their verdicts;
- ``tasks``: the analyses as tasks, the ledger's bookkeeping (``ledger.json``);
- ``settings``: the models, Table 1's groups, the presets, each run's flags.

This module re-exports their public names: ``from experiments import figures; figures.RUNS``.
"""
from experiments.figures.runner import RUNNERS, Context, call_script, load_script, locate_runs, run_fig2, run_fig3, \
    run_fig4, run_figures, run_table1, train_runs, training_data
from experiments.figures.reporting import DERIVED, MARK_BEGIN, MARK_END, STABLE_DIGITS, render_markdown, \
    replace_section, report, stable_floats
from experiments.figures.plots import plot_fig1, plot_fig2, plot_fig3, plot_fig4
from experiments.figures.summaries import CLEAR_DB, NOISE_DB, fig2_summary, fig3_summary, fig4_summary, \
    line_metrics, load_samples, read_csv, table1_rows, table1_summary
from experiments.figures.tasks import LEDGER_JSON, Task, build_tasks, check_settings, ledger_status, load_ledger, \
    repo_rel, sampler_tag, save_ledger, table1_key, task_done
from experiments.figures.settings import BASELINE, DEEP, GROUPS, ROOT, RUN_BY_NAME, RUNS, SCRIPTS, SETTINGS, \
    TABLE1_ROWS, X0_PRED, GanScale, RunSpec, Settings, config_mismatches, diffusion_flags, gan_finished, \
    gan_flags, settings_for
from experiments.study.arms import flags_to_argv

__all__ = ["BASELINE", "DEEP", "X0_PRED", "RUNS", "GROUPS", "SETTINGS", "Settings", "GanScale", "RunSpec", "Task",
           "build_tasks", "run_figures", "report", "table1_rows", "ledger_status", "replace_section", "settings_for"]
