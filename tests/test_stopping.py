"""Stopping and checkpoints, in-process: a stop request ends training at the next step and the rerun resumes
from the checkpoint to the same weights; SIGINT and SIGTERM set the stop flag before the handler they replace;
a checkpoint write that fills the disk leaves no partial file and fails once, naming the path; the
temporary Prefect API that does not start says what to set. The real-process cases (the CLI stopped by
SIGINT / SIGTERM in training and in generation) are in ``tests/test_stopping_processes.py``."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from indusfactory.config import TrainingConfig
from indusfactory.infra import failures, stopping, storage
from indusfactory.infra.errors import StorageSpaceError
from indusfactory.layout import CHECKPOINT_FILE
from indusfactory.learning.training import load_checkpoint, run_training


@pytest.fixture(autouse=True)
def _no_stop_left():
    stopping.reset()
    yield
    stopping.reset()


TARGETS = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [0.0, 1.0, 0.0], [2.0, 2.0, 2.0]])


def _train(checkpoint_uri: str | None, steps: int = 6, on_step=None):
    weight = torch.nn.Parameter(torch.zeros(3))
    config = TrainingConfig(steps=steps, batch_size=2, learning_rate=0.1, checkpoint_every=2, validation_images=0)

    def step(index, generator):
        return ((weight - TARGETS[index]) ** 2).mean()

    losses, _ = run_training(
        [weight], config, len(TARGETS), step, "toy", checkpoint_uri=checkpoint_uri, on_step=on_step
    )
    return weight.detach().clone(), losses


def _stop_at(step_to_stop: int):
    def on_step(step: int) -> None:
        if step == step_to_stop:
            stopping.request_stop(signal.SIGTERM)

    return on_step


def test_a_stop_request_ends_training_at_the_next_step_and_the_rerun_resumes_to_the_same_weights(tmp_path, caplog):
    reference, reference_losses = _train(None)
    checkpoint = str(tmp_path / "model.checkpoint")
    with pytest.raises(stopping.StopRequested, match="SIGTERM during toy, step 4"):
        _train(checkpoint, on_step=_stop_at(3))
    assert int(load_checkpoint(checkpoint)["step"]) == 2, "the last checkpoint before the stop is kept"
    assert not [p for p in os.listdir(checkpoint) if p.startswith(storage.TMP_PREFIX)]
    stopping.reset()
    with caplog.at_level("INFO", logger="indusfactory.training"):
        weights, losses = _train(checkpoint)
    assert "resuming from the checkpoint at step 2 of 6" in caplog.text
    assert torch.equal(weights, reference) and losses == reference_losses


def test_a_stop_is_not_retried_by_prefect():
    from tasks._prefect import retry_unless_bad_input

    failed = SimpleNamespace(result=lambda: (_ for _ in ()).throw(ConnectionResetError("dropped")))
    assert retry_unless_bad_input(None, None, failed), "a dropped connection is retried"
    stopping.request_stop(signal.SIGINT)
    assert not retry_unless_bad_input(None, None, failed), "nothing is retried once a stop was asked"


def test_signals_set_the_stop_flag_then_run_the_handler_they_replace_and_are_restored():
    before = {s: signal.getsignal(s) for s in stopping.SIGNALS}

    class Replaced(BaseException):
        pass

    def previous(signum, frame):
        raise Replaced(signum)

    signal.signal(signal.SIGTERM, previous)
    try:
        stopped_in_thread = threading.Event()

        def worker():  # a loop in a worker thread, which no signal reaches: it checks the flag
            try:
                while True:
                    stopping.check("worker")
                    time.sleep(0.01)
            except stopping.StopRequested:
                stopped_in_thread.set()

        thread = threading.Thread(target=worker)
        thread.start()
        with pytest.raises(Replaced), stopping.stopping_on_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises in the main thread first
        assert stopping.stop_requested() and stopping.stop_signal() == signal.SIGTERM
        thread.join(5)
        assert stopped_in_thread.is_set(), "the worker thread stopped at its next check"
        assert signal.getsignal(signal.SIGTERM) is previous, "the handler before is restored"

        stopping.reset()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with pytest.raises(stopping.StopRequested, match="SIGTERM"), stopping.stopping_on_signals():
            os.kill(os.getpid(), signal.SIGTERM)  # the default (terminate at once) is replaced by a clean stop
            time.sleep(5)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def test_a_second_ctrl_c_is_a_repeat_once_even_through_nested_handlers():
    repeats = []
    before = signal.getsignal(signal.SIGINT)
    # Python's own Ctrl-C handler, also where SIGINT was ignored (a suite started in the background of a script)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with stopping.stopping_on_signals(on_repeat=repeats.append), stopping.stopping_on_signals():
            for _ in range(2):
                with pytest.raises(KeyboardInterrupt):
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(5)
                assert len(repeats) <= 1
        assert repeats == [signal.SIGINT], "the first Ctrl-C stops cleanly, the second is the repeat"
    finally:
        signal.signal(signal.SIGINT, before)


class FullDisk:
    """A local filesystem whose ``open`` for writing a file named ``name`` writes half, then fails with ENOSPC
    (from the ``fail_on``-th such write on)."""

    def __init__(self, fs, name: str, fail_on: int):
        self.fs, self.name, self.fail_on, self.writes = fs, name, fail_on, 0

    def __getattr__(self, attr):
        return getattr(self.fs, attr)

    def open(self, path, mode="rb", **kwargs):
        handle = self.fs.open(path, mode, **kwargs)
        if "w" not in mode or not path.endswith(self.name):
            return handle
        self.writes += 1
        if self.writes < self.fail_on:
            return handle
        real_write = handle.write

        def write(data):
            real_write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        handle.write = write
        return handle


def test_a_full_disk_during_a_checkpoint_write_leaves_no_partial_file_and_fails_once_naming_the_path(
    tmp_path, monkeypatch
):
    checkpoint = str(tmp_path / "model.checkpoint")
    real = storage.filesystem
    disks: list[FullDisk] = []

    def filesystem(uri):
        fs, path = real(uri)
        disks.append(FullDisk(fs, CHECKPOINT_FILE, fail_on=2 - sum(d.writes for d in disks)))
        return disks[-1], path

    monkeypatch.setattr(storage, "filesystem", filesystem)
    with pytest.raises(StorageSpaceError) as caught:
        _train(checkpoint)  # checkpoints at steps 2 and 4: the second write fills the disk
    message = str(caught.value)
    assert os.path.join(checkpoint, CHECKPOINT_FILE) in message and "no space left" in message
    assert failures.is_permanent(caught.value), "not retried"
    assert isinstance(caught.value, OSError) and caught.value.__cause__.errno == errno.ENOSPC
    assert os.listdir(checkpoint) == [CHECKPOINT_FILE], "no partial file; the step-2 checkpoint is intact"
    monkeypatch.setattr(storage, "filesystem", real)
    assert int(load_checkpoint(checkpoint)["step"]) == 2


def test_partial_checkpoint_files_of_a_killed_write_are_removed_before_training(tmp_path):
    checkpoint = tmp_path / "model.checkpoint"
    checkpoint.mkdir()
    stale = checkpoint / f"{storage.TMP_PREFIX}0123-{CHECKPOINT_FILE}"
    stale.write_bytes(b"\0" * 1000)
    _train(str(checkpoint), steps=2)
    assert not stale.exists()


def test_a_temporary_prefect_api_that_does_not_start_says_what_to_set_and_is_not_left_running(
    tmp_path, monkeypatch, make_config
):
    import yaml
    from typer.testing import CliRunner

    import flows.local_api as local_api
    from flows.cli import app

    started: list[subprocess.Popen] = []
    server_class = local_api._server_class

    def never_answering():  # the real server class, running a process that never answers
        cls = server_class()

        class Silent(cls):
            def _run_uvicorn_command(self):
                started.append(super()._run_uvicorn_command())
                return started[-1]

        return Silent

    monkeypatch.setattr(local_api, "_server_class", never_answering)
    monkeypatch.setattr(
        local_api, "server_command", lambda port: [sys.executable, "-c", "import time; time.sleep(120)"]
    )
    monkeypatch.setattr(local_api, "configured_api_url", lambda: None)
    monkeypatch.setenv(local_api.TIMEOUT_SETTING, "2")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(make_config().model_dump(mode="json", exclude_defaults=True)))
    result = CliRunner().invoke(app, ["run", str(path), "--stage", "ingest"])
    assert result.exit_code == 2, result.output
    assert "did not start within 2 s" in result.output
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=600" in result.output
    assert "prefect server start" in result.output and "PREFECT_API_URL=" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 6
    assert len(started) == 1 and started[0].poll() is not None, "the server that never answered is stopped"


def test_a_stop_between_sampling_steps_still_runs_the_guidance_cut_off_first():
    """Generation's step-end callback chains the guidance cut-off (when one is set) and the stop check: both
    ride on diffusers' single ``callback_on_step_end`` (the two once collided as a duplicate keyword)."""
    from indusfactory.generation.generate import _then_stop
    from indusfactory.infra import stopping

    calls: list[int] = []

    def cut_off(pipe, step, timestep, tensors):
        calls.append(step)
        return {**tensors, "seen": step}

    callback = _then_stop(cut_off)
    assert callback(None, 0, 999, {}) == {"seen": 0} and calls == [0]
    assert _then_stop(None)(None, 1, 998, {"x": 1}) == {"x": 1}
    stopping.request_stop()
    try:
        with pytest.raises(stopping.StopRequested):
            callback(None, 1, 998, {})
        assert calls == [0, 1], "the cut-off ran before the stop"
    finally:
        stopping.reset()
