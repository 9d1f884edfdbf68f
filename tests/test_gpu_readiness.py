"""What a first GPU run depends on, where a CPU can show it: progress kept off Ray Train's report barrier."""

import json

from conftest import TINY_GPT2, tiny_args

from raylm import LanguageModelingModel
from raylm.training import in_process


def test_progress_reaches_the_driver_every_logging_step_but_ray_at_most_once_per_controller_poll(
    ray_session, corpus, tmp_path, monkeypatch
):
    """ray.train.report is a barrier that waits for Ray's controller poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S):
    logging every step must not report to Ray every step, while the run log still gets every step."""
    progress_reports = []
    report = in_process.DriverTrainFnUtils.report

    def counting_report(self, metrics, checkpoint=None, **kwargs):
        if checkpoint is None and "loss" in metrics:
            progress_reports.append(metrics["global_step"])
        return report(self, metrics, checkpoint, **kwargs)

    monkeypatch.setattr(in_process.DriverTrainFnUtils, "report", counting_report)
    # The worker reads the controller's poll interval from the job's environment (the driver's, in the driver).
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3600")
    steps = 6
    args = tiny_args(tmp_path / "out", mlm=False, vocab_size=300, config=TINY_GPT2, max_steps=steps, logging_steps=1)
    model = LanguageModelingModel("gpt2", None, args=args, train_files=corpus[0])
    model.train_model(corpus[0])

    log = [json.loads(line) for line in (tmp_path / "out" / "training_log.jsonl").read_text().splitlines()]
    assert [e["global_step"] for e in log if e["kind"] == "train"] == list(range(1, steps + 1))
    assert progress_reports == []
