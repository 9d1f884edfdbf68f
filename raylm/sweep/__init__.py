"""Hyperparameter sweeps: a raylm job plus a search space -> Ray Tune trials -> the best model.

job (raylm.train's schema) + sweep (raylm's schema, or a W&B `sweep_config`, translated) ->
`SweepConfig` -> a Tuner whose trials each run the job with the sampled values through
`LanguageModelingModel.train_model`. That is Ray Train inside Tune as Train V2 wants it: the trial
is the run's driver and fits its own TorchTrainer, and `TuneReportCallback` hands rank 0's
evaluation reports to Tune, so ASHA can stop poor trials early. Checkpoints are the runs' own
(`<storage_path>/<experiment>/trials/<trial id>/`). At the end: a table of the trials,
best_config.json and best_checkpoint.json in the experiment folder, and the best evaluation's
model in Hugging Face format in output_dir. Running the same experiment again resumes it.

space.py reads and checks the sweep, trials.py runs one trial and tells how it ended, tuner.py runs them all.
"""

from raylm.sweep.space import SweepConfig
from raylm.sweep.trials import SweepResult
from raylm.sweep.tuner import run_sweep

__all__ = ["SweepConfig", "SweepResult", "run_sweep"]
