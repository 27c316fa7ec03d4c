"""What docs/reliability.md promises, each with the test that proves it: checkpoints at any step that survive
kills, corrupt files and full disks; resume: auto; stop signals; a dead or hung rank; non-finite steps.

In process (fast): the Checkpointer (common/checkpoints.py) and StepMetrics (common/step_metrics.py) on a tiny
model. As a user would (subprocesses): SIGTERM, a second signal, the stop deadline, SIGKILL in the middle of a
checkpoint write, and under torchrun a signal to one rank, a killed rank and a hung one; torchrun's rendezvous
form for several nodes, and the SLURM script's re-queue of a pre-empted job. The battery (test_battery.py)
resumes every method from mid-epoch checkpoints with 0 and 2 data workers."""
import contextlib
import errno
import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

from battery import quick_args, run_ranks
from helpers import REPO, RunConfig, _env, assert_ok, assert_one_line_error, read_jsonl, run_script, run_torchrun
from common.checkpoints import Checkpointer
from common.config import UsageError
from common.distributed import EXIT_LOST_RANK
from common.probe import OnlineProbe
from common.run_folder import check_run, trim_metrics
from common.step_metrics import StepMetrics
from common.stopping import EXIT_FORCED, EXIT_PREEMPTED

CPU = torch.device("cpu")


class Tiny(nn.Module):
    def __init__(self, arch="tiny"):
        super().__init__()
        self.backbone = nn.Linear(3, 2)
        self.backbone_args = {"arch": arch, "image_size": 8}


SCHEDULE = {"world_size": 1, "global_batch": 16, "steps_per_epoch": 4, "total_steps": 8, "peak_lr": 0.1}


def make_run(tmp_path, model=None, scaler_on=False, rank=0, world_size=1, **settings):
    """A Checkpointer of a tiny model in tmp_path/run, as a method script builds it."""
    cfg = RunConfig(out_dir=str(tmp_path / "run"), **settings)
    model = model or Tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=scaler_on)
    metrics = StepMetrics(cfg.out_dir)
    no_probe = OnlineProbe(cfg, model, None, rank, world_size, CPU, "fp32")  # probe_every 0
    return Checkpointer(cfg, SCHEDULE, model, optimizer, scaler, metrics, no_probe, CPU, rank, world_size), model


def train_steps(checkpointer, model, first, last):
    """Steps first..last (1-based) of SGD on a fixed toy loss, saving where the script would."""
    for step in range(first, last + 1):
        x = torch.full((4, 3), float(step))
        loss = model.backbone(x).pow(2).mean()
        checkpointer.optimizer.zero_grad()
        loss.backward()
        checkpointer.optimizer.step()
        checkpointer.metrics.add(loss=loss)
        if checkpointer.due(step) or step % SCHEDULE["steps_per_epoch"] == 0:
            checkpointer.metrics.read(step)
            checkpointer.save(step)


@pytest.fixture(autouse=True)
def default_signal_handlers():
    """A Checkpointer installs handlers for SIGTERM / SIGUSR1: give pytest its own back after each test."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


# ---- files: step checkpoints, last.pt, snapshots, pruning ----
def test_checkpoints_at_steps_and_epochs_and_pruning(tmp_path):
    checkpointer, model = make_run(tmp_path, checkpoint_every_steps=3, keep_checkpoints=2)
    train_steps(checkpointer, model, 1, 8)  # checkpoints at 3, 4 (epoch 1), 6, 8 (epoch 2)
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["epoch_0001.pt", "epoch_0002.pt", "last.pt",
                                                     "step_00000006.pt", "step_00000008.pt"]
    assert (run / "last.pt").samefile(run / "step_00000008.pt")  # a hard link: written once
    assert torch.load(run / "epoch_0001.pt", weights_only=True)["step"] == 4  # outlives its pruned step file
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert (ckpt["step"], ckpt["epoch"], ckpt["method"]) == (8, 2, "Tiny")


def test_resume_continues_from_the_newest_checkpoint(tmp_path, capsys):
    """The newest step file, also where a kill came between writing it and linking last.pt to it."""
    checkpointer, model = make_run(tmp_path, checkpoint_every_steps=3)
    train_steps(checkpointer, model, 1, 6)
    run = tmp_path / "run"
    (run / "last.pt").unlink()
    os.link(run / "step_00000004.pt", run / "last.pt")
    (run / "step_00000007.pt.tmp").write_bytes(b"half a checkpoint")
    resumed, fresh = make_run(tmp_path)
    assert resumed.resume() == 6 and torch.equal(fresh.backbone.weight, model.backbone.weight)
    assert f"resuming from {run / 'step_00000006.pt'} at step 6" in capsys.readouterr().out
    assert not list(run.glob("*.tmp"))  # the cut-off write is gone


def test_a_stop_signal_checkpoints_after_the_step_it_came_in(tmp_path):
    """Mid-epoch: due() says so, and save() exits with 75. At an epoch's last step the end-of-epoch save does it,
    after the epoch is logged."""
    checkpointer, model = make_run(tmp_path)
    train_steps(checkpointer, model, 1, 5)
    checkpointer.signals.signal = "SIGTERM"
    assert checkpointer.due(6)
    checkpointer.metrics.read(6)
    with pytest.raises(SystemExit) as stopped:
        checkpointer.save(6)
    assert stopped.value.code == EXIT_PREEMPTED and torch.load(tmp_path / "run" / "last.pt")["step"] == 6
    assert not checkpointer.due(8)  # the epoch's last step: left to the end-of-epoch save, which exits too
    with pytest.raises(SystemExit):
        checkpointer.save(8)


def _resume_on(rank, world_size, folders):
    """A rank whose out_dir is its own folder (a node-local disk): one holds a checkpoint, the other none."""
    checkpointer, _ = make_run(folders[rank], rank=rank, world_size=world_size)
    try:
        checkpointer.resume()
    except UsageError as e:
        return str(e)
    return "resumed"


def test_ranks_that_find_different_checkpoints_stop(tmp_path):
    checkpointer, model = make_run(tmp_path / "a")
    train_steps(checkpointer, model, 1, 4)
    (tmp_path / "b").mkdir()
    for message in run_ranks(_resume_on, 2, [tmp_path / "a", tmp_path / "b"]):
        assert "the ranks found different checkpoints" in message and "(steps 0 to 4)" in message


def test_a_corrupt_last_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, capsys):
    """last.pt and its step file are one file; cut it short (a full disk on a file system without atomic
    renames, a bad copy): the resume names it, takes the step before, and sets the bad file aside."""
    checkpointer, model = make_run(tmp_path, checkpoint_every_steps=3, keep_checkpoints=3)
    train_steps(checkpointer, model, 1, 6)  # step files 3, 4, 6
    run = tmp_path / "run"
    os.truncate(run / "last.pt", 1000)
    resumed, _ = make_run(tmp_path)
    assert resumed.resume() == 4
    err = capsys.readouterr().err
    assert f"cannot read checkpoint {run / 'step_00000006.pt'}" in err
    assert f"Resuming from {run / 'step_00000004.pt'}, the newest intact checkpoint" in err
    assert (run / "step_00000006.pt.corrupt").exists() and not (run / "step_00000006.pt").exists()
    for path in run.glob("*.pt"):  # nothing but a full save writes there
        path.write_bytes(b"garbage")
    with pytest.raises(UsageError, match="every checkpoint in .* is unreadable"):
        make_run(tmp_path)[0].resume()


@pytest.mark.quick
def test_a_checkpoint_of_another_method_or_backbone_is_named(tmp_path):
    checkpointer, model = make_run(tmp_path)
    train_steps(checkpointer, model, 1, 4)

    class Other(Tiny):
        pass

    with pytest.raises(UsageError, match=r"holds a run of Tiny with a tiny at 8 px; this run is Other with a tiny at "
                                         r"8 px\. Resume it with the script"):
        make_run(tmp_path, model=Other())[0].resume()
    with pytest.raises(UsageError, match="holds a run of Tiny with a tiny at 8 px; this run is Tiny with a big"):
        make_run(tmp_path, model=Tiny(arch="big"))[0].resume()


def test_resume_modes(tmp_path, capsys):
    """auto: a new run where there is none, the run where it has these settings (run-only keys such as
    num_workers aside), an error where its settings differ; true: must resume, applies changed settings;
    false: must not find a run."""
    cfg = RunConfig(out_dir=str(tmp_path / "run"))
    check_run(cfg)  # auto, nothing there: a new run
    assert make_run(tmp_path)[0].resume() == 0
    with pytest.raises(UsageError, match="--resume true: .* holds no checkpoint"):
        check_run(RunConfig(out_dir=cfg.out_dir, resume="true"))
    checkpointer, model = make_run(tmp_path)
    train_steps(checkpointer, model, 1, 4)
    with pytest.raises(UsageError, match=r"already holds a run \(step_00000004.pt\); pass --resume auto"):
        check_run(RunConfig(out_dir=cfg.out_dir, resume="false"))
    with pytest.raises(UsageError, match="resume must be auto, true or false, got 'yes'"):
        check_run(RunConfig(out_dir=cfg.out_dir, resume="yes"))
    assert make_run(tmp_path, num_workers=8)[0].resume() == 4  # how it runs, not what it computes
    with pytest.raises(UsageError, match=r"holds a run with other settings \(lr: 0.1 -> 0.2\); pass --resume true"):
        make_run(tmp_path, lr=0.2)[0].resume()
    capsys.readouterr()
    assert make_run(tmp_path, lr=0.2, resume="true")[0].resume() == 4
    assert "resuming with changed settings: lr: 0.1 -> 0.2" in capsys.readouterr().out


@pytest.mark.quick
def test_an_unwritable_run_folder_is_found_before_training(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(UsageError, match="cannot write the run folder .*file/run .*; choose another --out_dir"):
        check_run(RunConfig(out_dir=str(tmp_path / "file" / "run")))

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("os.write", disk_full)  # the probe writes a megabyte: a full disk cannot take it
    with pytest.raises(UsageError, match="cannot write the run folder .* \\(No space left on device\\)"):
        check_run(RunConfig(out_dir=str(tmp_path / "run")))
    monkeypatch.setattr("tempfile.mkstemp", read_only)
    with pytest.raises(UsageError, match="cannot write the run folder .* \\(Read-only file system\\)"):
        check_run(RunConfig(out_dir=str(tmp_path / "run")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_full_disk_loses_nothing_already_saved(tmp_path, monkeypatch):
    checkpointer, model = make_run(tmp_path, checkpoint_every_steps=3)
    train_steps(checkpointer, model, 1, 3)
    run = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in run.iterdir()}

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit, match=r"could not write a checkpoint in .* \(No space left on device\); stopped, "
                                         "and the checkpoints already written are intact"):
        train_steps(checkpointer, model, 4, 4)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # no .tmp left, nothing changed


def test_non_finite_weights_are_never_written(tmp_path):
    checkpointer, model = make_run(tmp_path)
    with torch.no_grad():
        model.backbone.weight[0, 0] = float("inf")
    with pytest.raises(SystemExit, match="the weights or the optimizer state are not finite after step 7; .*"
                                         "keeps the last good state"):
        checkpointer.save(7)
    with torch.no_grad():  # finite weights, a NaN momentum buffer (a group at lr 0 keeps its weights finite)
        model.backbone.weight[0, 0] = 1.0
    checkpointer.optimizer.state[model.backbone.weight]["momentum_buffer"] = torch.full((2, 3), float("nan"))
    with pytest.raises(SystemExit, match="not finite after step 8"):
        checkpointer.save(8)
    assert not (tmp_path / "run").exists()


def test_resume_of_a_bf16_run_in_fp16_starts_a_fresh_grad_scaler(tmp_path, capsys):
    """precision auto: a run started in bf16 (no GradScaler state) and resumed where fp16 is chosen (V100) goes
    on with a fresh scaler instead of failing on the empty state; the weights and the step come back."""
    checkpointer, model = make_run(tmp_path)
    train_steps(checkpointer, model, 1, 4)
    resumed, fresh = make_run(tmp_path, scaler_on=True)
    assert resumed.resume() == 4 and torch.equal(fresh.backbone.weight, model.backbone.weight)
    assert "fp16 starts a fresh one" in capsys.readouterr().out and resumed.scaler.get_scale() == 65536.0


def test_metrics_of_steps_after_the_checkpoint_are_dropped_on_resume(tmp_path):
    """A killed run logged steps its resumed run does again, maybe half a line: they go."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "config"}\n{"step": 4, "train/loss": 1.0}\n{"step": 5, "train/loss": 0.9}\n'
                    '{"step": 6, "tr')
    trim_metrics(str(tmp_path), 4)
    assert read_jsonl(path) == [{"event": "config"}, {"step": 4, "train/loss": 1.0}]


# ---- non-finite steps ----
@pytest.mark.quick
def test_a_non_finite_gradient_stops_the_run_naming_the_step_and_the_last_finite_loss():
    metrics = StepMetrics("runs/x")
    for loss, norm in [(2.0, 1.0), (1.5, 1.0), (1.4, float("inf")), (float("nan"), float("nan"))]:
        assert metrics.add(loss=torch.tensor(loss), grad_norm=torch.tensor(norm))  # no check on the host
    with pytest.raises(SystemExit, match=r"error: step 8 was not finite \(loss 1.4, grad_norm inf; last finite loss "
                                         r"1.5\); stopped without writing a checkpoint"):
        metrics.read(9)
    fp16 = StepMetrics("runs/x", precision="fp16")  # overflowing gradients are the GradScaler's to skip
    fp16.add(loss=torch.tensor(1.0), grad_norm=torch.tensor(float("inf")))
    fp16.add(loss=torch.tensor(3.0), grad_norm=torch.tensor(2.0))
    assert fp16.read(2) == {"train/loss": 2.0, "train/grad_norm": 2.0}  # the mean of the applied steps' norms


def test_skip_nonfinite_skips_a_bounded_number_of_steps(capsys):
    metrics = StepMetrics("runs/x", skip_nonfinite=3)
    assert metrics.add(loss=torch.tensor(1.0), grad_norm=torch.tensor(1.0))
    assert not metrics.add(loss=torch.tensor(float("nan")), grad_norm=torch.tensor(1.0))
    assert not metrics.add(loss=torch.tensor(1.0), grad_norm=torch.tensor(float("inf")))
    assert "skipped a step with a non-finite loss or gradient (2 of at most 3)" in capsys.readouterr().err
    # skipped steps are not averaged; a window of skipped steps only reads NaN (no crash of the log line)
    assert metrics.read(4) == {"train/loss": 1.0, "train/grad_norm": 1.0, "train/skipped_steps": 2}
    assert not metrics.add(loss=torch.tensor(float("nan")), grad_norm=torch.tensor(1.0)) and metrics.skipped == 3
    assert all(math.isnan(v) for k, v in metrics.read(5).items() if k != "train/skipped_steps")
    assert metrics.state_dict()["skipped"] == 3  # a resumed run keeps counting
    with pytest.raises(SystemExit, match="more than skip_nonfinite=3 steps had a non-finite loss or gradient "
                                         r"\(last finite loss 1\)"):
        metrics.add(loss=torch.tensor(float("inf")), grad_norm=torch.tensor(1.0))


def test_a_script_skips_at_most_skip_nonfinite_steps(tmp_path):
    """The loop's wiring: at lr 1e30 the first step blows the weights up; every later step is non-finite and
    skipped, until the third, which stops the run before any checkpoint."""
    result = run_script(quick_args("simclr", tmp_path / "run", "--optimizer", "sgd", "--lr", "1e30",
                                   "--warmup_epochs", "0", "--skip_nonfinite", "2"))
    assert "skipped a step with a non-finite loss or gradient (2 of at most 2)" in result.stderr
    assert_one_line_error(result, "more than skip_nonfinite=2 steps had a non-finite loss or gradient")
    assert not list((tmp_path / "run").glob("*.pt"))


# ---- as a user runs it: signals, kills, a dead or hung rank ----
LONG = ("--epochs", "3", "--log_every", "1", "--checkpoint_every_steps", "2", "--checkpoint_every_minutes", "0")


def start(args, torchrun=False, restarts=0):
    """Start a script (under torchrun with 2 ranks) in its own process group, as a job scheduler would."""
    prefix = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", f"--max-restarts={restarts}",
              "tests/nccl_rules.py"]  # NCCL's rules for collectives (as run_torchrun)
    prefix = prefix if torchrun else []
    # torchrun's restarted workers otherwise now and then read the previous attempt's addresses from the agent's
    # store and fail to connect (pytorch/pytorch#135712; 1 restart in 3 here): docs/reliability.md says to set it
    env = dict(_env(), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    return subprocess.Popen([sys.executable, *prefix, *map(str, args)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def wait_for(condition, proc, what, timeout=120):
    """Poll condition() every 2 ms until it is true; fail if proc ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) before {what}:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.002)
    raise AssertionError(f"timed out waiting for {what}")


def logged_step(out):
    """The last step in out/metrics.jsonl (0 before the first)."""
    path = out / "metrics.jsonl"
    steps = [0]
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(ValueError):  # a line being written
            steps.append(json.loads(line).get("step", 0))
    return max(steps)


def rank_pid(torchrun, rank):
    """The pid of a torchrun worker by its RANK."""
    for child in subprocess.run(["pgrep", "-P", str(torchrun.pid)], capture_output=True, text=True).stdout.split():
        try:
            environ = open(f"/proc/{child}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(child)
    raise AssertionError(f"no worker of rank {rank}")


def finish(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_same_weights(a, b):
    a, b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert a["step"] == b["step"]
    for name in b["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), f"{name} differs from the uninterrupted run"


def test_sigterm_then_a_kill_during_a_checkpoint_write_give_the_uninterrupted_weights(tmp_path):
    """One process, 12 steps, a checkpoint every 2: SIGTERM at a random step makes it finish the step, checkpoint
    and exit with 75; the same command resumes; SIGKILL while it writes a checkpoint leaves the previous ones
    intact; the same command again ends with exactly the weights of an uninterrupted run."""
    straight = tmp_path / "straight"
    assert_ok(run_script(quick_args("simclr", straight, *LONG, "--views", "workers")))
    out, args = tmp_path / "run", quick_args("simclr", tmp_path / "run", *LONG, "--views", "workers")
    stop_at = random.randint(2, 7)

    # views made in 2 loader workers, which the signal reaches too (their number: how it runs, not what it
    # computes, so the runs below resume it with none)
    proc = start([*args, "--num_workers", "2"])
    wait_for(lambda: logged_step(out) >= stop_at, proc, f"step {stop_at}")
    os.killpg(proc.pid, signal.SIGTERM)  # as SLURM: to every process of the job, data workers too
    stopped = finish(proc)
    assert stopped.returncode == EXIT_PREEMPTED, stopped.stderr[-3000:]
    saved = torch.load(out / "last.pt", weights_only=True)["step"]
    assert saved >= stop_at and f"writing a checkpoint after step {saved}" in stopped.stderr
    assert (out / f"step_{saved:08d}.pt").exists()

    proc = start(args)
    wait_for(lambda: any(p.name.startswith("step_") and p.suffix == ".tmp" for p in out.iterdir()), proc,
             "a checkpoint being written")
    proc.kill()
    assert finish(proc).returncode == -signal.SIGKILL
    intact = torch.load(out / "last.pt", weights_only=True)["step"]  # the previous checkpoint loads
    assert intact >= saved

    resumed = run_script(args)
    assert_ok(resumed)
    assert f"at step {intact}" in resumed.stdout
    assert_same_weights(out / "last.pt", straight / "last.pt")
    assert not list(out.glob("*.tmp"))
    finished = (out / "last.pt").stat().st_mtime_ns
    assert_ok(run_script(args))  # a re-queued job of a finished run: nothing to do
    assert (out / "last.pt").stat().st_mtime_ns == finished


def test_a_second_signal_or_the_deadline_exits_at_once(tmp_path):
    """SIGTERM twice at once is one signal (SLURM's to every process, and torchrun's forward of it): a checkpoint
    and 75. SIGUSR1 then SIGTERM (the time limit after SLURM's warning): 76 at once. A stop_timeout too short for
    the checkpoint: 76."""
    def signalled(name, signals, *extra):
        """A short run in tmp_path/name, sent `signals` at once after its first step; its CompletedProcess."""
        proc = start(quick_args("simclr", tmp_path / name, *LONG, *extra))
        wait_for(lambda: logged_step(tmp_path / name) >= 1, proc, "step 1")
        for signum in signals:
            proc.send_signal(signum)
        return finish(proc)

    result = signalled("twice", [signal.SIGTERM, signal.SIGTERM])
    assert result.returncode == EXIT_PREEMPTED, result.stderr[-3000:]
    result = signalled("two", [signal.SIGUSR1, signal.SIGTERM])
    assert result.returncode == EXIT_FORCED, result.stderr[-3000:]
    assert "SIGTERM after SIGUSR1: exiting now" in result.stderr
    result = signalled("deadline", [signal.SIGTERM], "--stop_timeout", "0.001")
    assert result.returncode == EXIT_FORCED, result.stderr[-3000:]
    assert "no checkpoint within stop_timeout 0.001 s of SIGTERM" in result.stderr


TORCHRUN = ("--subset", "128", "--epochs", "2", "--log_every", "1", "--checkpoint_every_steps", "2",
            "--checkpoint_every_minutes", "0")


def test_torchrun_a_signal_to_one_rank_then_a_killed_rank_give_the_uninterrupted_weights(tmp_path):
    """2 ranks x 16, 8 steps. SIGTERM to rank 1 alone: both ranks checkpoint after the same step and exit with 75.
    Run again with torchrun --max-restarts=1; SIGKILL rank 0 while it writes a checkpoint: rank 1 says it lost
    its peer, torchrun restarts both, which resume by themselves (resume: auto) from the checkpoint before and
    end with the weights of the uninterrupted run."""
    straight = tmp_path / "straight"
    assert_ok(run_torchrun(2, quick_args("simclr", straight, *TORCHRUN)))
    out = tmp_path / "run"
    args = quick_args("simclr", out, *TORCHRUN)

    proc = start(args, torchrun=True)
    wait_for(lambda: logged_step(out) >= 2, proc, "step 2")
    os.kill(rank_pid(proc, 1), signal.SIGTERM)
    stopped = finish(proc)
    assert stopped.returncode != 0 and f"exitcode: {EXIT_PREEMPTED}" in stopped.stderr, stopped.stderr[-3000:]
    saved = torch.load(out / "last.pt", weights_only=True)["step"]
    assert f"a stop signal on another rank: writing a checkpoint after step {saved}" in stopped.stderr  # rank 0

    proc = start(args, torchrun=True, restarts=1)
    wait_for(lambda: any(p.name.startswith("step_") and p.suffix == ".tmp" for p in out.iterdir()), proc,
             "a checkpoint being written")
    os.kill(rank_pid(proc, 0), signal.SIGKILL)
    restarted = finish(proc)
    assert_ok(restarted)
    assert "error: rank 1 lost contact with the other processes of this job" in restarted.stderr
    assert restarted.stdout.count("resuming from") == 2 and f"at step {saved}" in restarted.stdout  # twice
    assert_same_weights(out / "last.pt", straight / "last.pt")


@pytest.mark.parametrize("message", ["Application timeout caused pair closure",  # gloo, inside DDP's broadcast
                                     "[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:6",
                                     "NCCL communicator was aborted on rank 1"])
def test_a_collective_that_lost_its_peer_is_one_line_and_its_own_status(message, monkeypatch, capsys):
    import torch.distributed as dist

    from common.distributed import lost_rank_errors
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(os, "_exit", lambda status: (_ for _ in ()).throw(SystemExit(status)))
    with pytest.raises(SystemExit, match=str(EXIT_LOST_RANK)), lost_rank_errors():
        raise RuntimeError(message)
    assert capsys.readouterr().err.startswith("error: rank 1 lost contact with the other processes of this job")
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"), lost_rank_errors():
        raise RuntimeError("shapes cannot be multiplied")  # not a collective's: the traceback stays


def test_torchrun_a_hung_rank_stops_the_job_within_dist_timeout(tmp_path):
    out = tmp_path / "run"
    proc = start(quick_args("simclr", out, *TORCHRUN, "--dist_timeout", "5"), torchrun=True)
    wait_for(lambda: logged_step(out) >= 1, proc, "step 1")
    hung, rank0 = rank_pid(proc, 1), rank_pid(proc, 0)
    os.kill(hung, signal.SIGSTOP)
    stopped_at = time.time()
    while os.path.exists(f"/proc/{rank0}") and "zombie" not in open(f"/proc/{rank0}/status").read():
        assert time.time() - stopped_at < 60, "rank 0 still waits for the hung rank"
        time.sleep(0.05)
    waited = time.time() - stopped_at
    os.kill(hung, signal.SIGCONT)
    result = finish(proc)
    assert "error: rank 0 lost contact with the other processes of this job" in result.stderr, result.stderr[-3000:]
    assert f"exitcode: {EXIT_LOST_RANK}" in result.stderr and waited < 5 + 20


# ---- several nodes: torchrun's rendezvous, and the SLURM script's re-queue ----
def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_the_rendezvous_form_of_torchrun_trains(tmp_path):
    """The multi-node command of README (--rdzv-backend=c10d, one endpoint for every node), on one machine with
    --nnodes=1: the two ranks meet at the rendezvous and train to the end."""
    run = tmp_path / "run"
    assert_ok(run_script(["-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--rdzv-backend=c10d",
                          f"--rdzv-endpoint=localhost:{_free_port()}", "--rdzv-id=readme", "tests/nccl_rules.py",
                          *quick_args("simclr", run, epochs=1)]))
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1


@pytest.mark.parametrize("exit_status, requeued", [(EXIT_PREEMPTED, True), (1, False)])
def test_the_slurm_script_requeues_a_preempted_job_only(tmp_path, exit_status, requeued):
    """scripts/slurm_multinode.sbatch with srun and scontrol stood in for (one node, two ranks on this CPU): a
    rank that exits with 75 (pre-empted after its checkpoint) has the job queued again, though torchrun itself
    exits 1; any other failure does not, so a broken job is not re-queued forever."""
    bin_dir, work = tmp_path / "bin", tmp_path / "work"
    bin_dir.mkdir()
    work.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nexec "$@"\n')
    (bin_dir / "scontrol").write_text('#!/bin/bash\n[ "$1" = show ] && echo localhost\n'
                                      f'[ "$1" = requeue ] && echo "$2" > {tmp_path}/requeued\nexit 0\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    method = tmp_path / "fake"  # the script runs "$method.py"
    method.with_suffix(".py").write_text(f"import sys\nsys.exit({exit_status})\n")
    env = dict(_env(), SLURM_JOB_ID="42", SLURM_NNODES="1", SLURM_GPUS_PER_NODE="gpu:2",
               SLURM_JOB_NODELIST="localhost",  # and this environment's torchrun on the PATH
               PATH=f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    done = subprocess.run(["bash", str(REPO / "scripts" / "slurm_multinode.sbatch"), str(method),
                           "configs/simclr.yaml"], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and (tmp_path / "requeued").exists() == requeued, done.stdout[-2000:]
    if requeued:
        assert (tmp_path / "requeued").read_text().strip() == "42"
    assert (work / "runs" / "simclr.slurm-42.0.log").exists()
