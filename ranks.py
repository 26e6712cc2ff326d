"""
The processes of a job, and the errors that stop it: what every entry point that may run under torchrun needs.

    Problem                 the one error type for people: raised anywhere, turned by each entry point into
                            `error: ...` (one line, `rank R (HOST): ` first under torchrun) and exit status 1
    start                   the process group (torchrun's, or one of a single process) with its timeout
    end                     leave after the last collective (gloo's threads may still hold the interpreter's objects)
    stop_if_any             every rank's problem gathered: one rank with a problem stops all of them
    Watchdog                heartbeats in the job's store; a rank whose work stops moving ends the job, naming
                            the ranks not heard from
    prove_shared            out_dir is one directory that every rank sees
    rank, from_rank0, share, gather   collectives that also work without a process group (checkpoint.py)

Depends on torch and the standard library only.
"""
import contextlib
import json
import os
import re
import secrets
import socket
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


class Problem(Exception):
    """A problem for people, not a bug: the message is one line saying what and where (none when it is empty: another
    rank prints the reason). Entry points print it with exit_with."""


# -----------------------------------------------------------------------------------------------------------
# one line, from the rank that found the problem


def under_torchrun():
    return "RANK" in os.environ


def torchrun_place():
    """(rank, world size) of this process as torchrun set them, before the process group exists; (0, 1) alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def rank_prefix():
    """`rank R (HOST): ` under torchrun, so that a line says which process of which node wrote it."""
    return f"rank {os.environ['RANK']} ({socket.gethostname()}): " if under_torchrun() else ""


def exit_with(message, log_file=None, now=False):
    """Print `error: ...`, hand the line to torchrun (its summary names this rank and shows it instead of `error_file:
    <N/A>`) and exit 1; `now` (the watchdog's thread, broken collectives) skips Python's teardown, which could wait."""
    if message:
        line = f"error: {rank_prefix()}{message}"
        print(line, file=sys.stderr, flush=True)
        if log_file:
            log_file.write(line + "\n")
            log_file.flush()
        if error_file := os.environ.get("TORCHELASTIC_ERROR_FILE"):  # a plain "message" is shown as it is
            Path(error_file).write_text(json.dumps({"message": line, "timestamp": int(time.time())}))
    if now or under_torchrun():  # under torchrun: leave at once, so that it ends the job
        os._exit(1)
    sys.exit(1)


def collective_failure(error):
    """The one line for gloo's report of a lost rank or a timed-out collective (a plain RuntimeError), or None when
    `error` is something else."""
    if not under_torchrun() or not (isinstance(error, dist.DistError) or "/gloo/" in str(error)):
        return None
    return "a collective failed: " + re.sub(r"^\[[^]]*\] ", "", str(error).splitlines()[0]).split(". ")[0]


def restart_warning():
    """A line when torchrun restarts workers with a store they share, which can hand out stale addresses; or None."""
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return ("warning: with --max-restarts, torchrun's store shared with the workers can give a restarted worker a "
                "peer's address from before the restart (it then fails to connect); run torchrun with "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1")
    return None


# -----------------------------------------------------------------------------------------------------------
# the process group, and agreeing in it


def start(timeout):
    """The process group, whose collectives fail after `timeout` seconds: torchrun's, else one of this process alone.
    -> this process's device: its GPU (nccl), else the CPU (gloo)."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    timeout = timedelta(seconds=timeout)
    if under_torchrun():
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return device


def end():
    """Leave after the job's last collective: the process group destroyed, the output flushed, the process ended with
    status 0 without Python's teardown. gloo's worker threads release a finished collective's tensors after the ranks
    have moved on, and that takes the interpreter lock; once DTensors exist (FSDP's parameters), torch keeps the
    process group and its threads alive past destroy_process_group, so a teardown that overlaps such a release aborts
    the process ("terminate called without an active exception", SIGABRT) after a job that succeeded. Files the
    caller wrote must be closed first."""
    if dist.is_initialized():
        dist.destroy_process_group()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def stop_if_any(problem):
    """Every rank's problem (a string, or None) is gathered; if any rank has one, that rank raises it (the lowest
    rank with it on each host), rank 0 also names the rank that stops the job, and every rank raises Problem.
    Collective: the first one after the process group starts, so a rank missing an input stops all of them in
    seconds."""
    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, (socket.gethostname(), problem))
    if not any(p for _, p in found):
        return
    rank = dist.get_rank()
    if problem and found.index(found[rank]) == rank:
        raise Problem(problem)
    if rank == 0 and not problem:
        first = next(r for r, (_, p) in enumerate(found) if p)
        raise Problem(f"stopped by rank {first} ({found[first][0]}): {found[first][1].splitlines()[0]}")
    raise Problem("")


def rank():
    return dist.get_rank() if dist.is_initialized() else 0



def from_rank0(obj):
    """Rank 0's obj on every process: one decision for all, whatever each process's view of the filesystem."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box)
    return box[0]



def share(names):
    """This process's part of a list of files, so that hashing is spread over all processes."""
    if dist.is_initialized():
        return names[dist.get_rank()::dist.get_world_size()]
    return names



def gather(part):
    """Merge per-process dicts (or lists) on every process."""
    if not dist.is_initialized():
        return part
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()} if isinstance(part, dict) else [x for p in parts for x in p]


# -----------------------------------------------------------------------------------------------------------
# the watchdog


class Watchdog:
    """Every rank's heartbeat and place (step, phase) in the job's c10d store (MASTER_ADDR:MASTER_PORT), and a
    monitor: a rank whose own work has not moved for `limit` seconds (it waits in a collective for a rank that is
    dead, stuck or unreachable) prints one line naming its step and the ranks not heard from, and exits, so that
    torchrun ends the job. The limit is a little under the process group's timeout, which on NCCL aborts the
    process without a word. With `others`, a rank also ends the job when another has not been heard from for
    `limit` seconds (dead, stopped or unreachable) while its own work still moves: ranks that work on their own
    for long (evaluate.py's shares) learn of a lost rank within the timeout rather than at their next meeting."""

    def __init__(self, rank, world, timeout, others=False):
        self.rank, self.world = rank, world
        self.limit = timeout - min(10.0, timeout / 10)
        self.beat = min(10.0, timeout / 10)  # seconds between heartbeats
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=max(self.beat, 5)))
        # keys of this attempt only (torchrun may keep its store over restarts): a name chosen by rank 0
        name = [secrets.token_hex(4)]
        dist.broadcast_object_list(name)
        self.store = dist.PrefixStore(f"watchdog/{name[0]}/", store)
        self.host, self.step, self.phase, self.moved = socket.gethostname(), 0, "setup", time.monotonic()
        self.others, self.started = others, time.monotonic()
        self.patience = 0  # > 0 while in patient()
        self.log_file, self.done, self.lock = None, threading.Event(), threading.Lock()
        self.send()
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()

    def at(self, step, phase):
        """This rank's work moved: now at `step`, doing `phase`."""
        self.step, self.phase, self.moved = step, phase, time.monotonic()

    @contextlib.contextmanager
    def patient(self, phase):
        """Long local work (hashing the shards, building the demo data), during which no stall is reported."""
        self.at(self.step, phase)
        self.patience += 1
        try:
            yield
        finally:
            self.patience -= 1
            self.at(self.step, phase)

    def send(self):
        self.store.set(f"beat/{self.rank}", json.dumps({"host": self.host, "step": self.step, "phase": self.phase,
                                                        "time": time.time()}))

    def watch(self):
        sent = time.monotonic()
        while not self.done.wait(min(1.0, self.beat)):
            if time.monotonic() - sent >= self.beat:
                sent = time.monotonic()
                try:
                    self.send()
                except Exception:  # the store's node is gone: torchrun is ending the job; keep watching this rank
                    pass
                try:
                    gone = self.others and time.monotonic() - self.started > self.limit and self.silent(self.limit)
                except Exception:  # as above
                    gone = False
                if gone:
                    self.fail("a rank stopped", stalled=False)
            if not self.patience and time.monotonic() - self.moved > self.limit:
                self.fail(f"no progress for {time.monotonic() - self.moved:.0f} s")

    def silent(self, older_than):
        """[(rank, description)] of the other ranks last heard from more than `older_than` seconds ago."""
        found = []
        for r in range(self.world):
            if r == self.rank:
                continue
            if not self.store.check([f"beat/{r}"]):
                found.append((r, f"rank {r} (never heard from)"))
                continue
            beat = json.loads(self.store.get(f"beat/{r}"))
            if time.time() - beat["time"] > older_than:
                found.append((r, f"rank {r} ({beat['host']}, last heard {time.time() - beat['time']:.0f} s ago, at "
                                 f"step {beat['step']}, {beat['phase']})"))
        return found

    def fail(self, what, stalled=True):
        """Print this rank's step and the ranks not heard from, and exit 1. From any thread: the first call ends the
        process, a second one waits for that."""
        self.lock.acquire()
        try:
            silent = [d for _, d in self.silent(older_than=min(self.limit / 2, 3 * self.beat))]
            others = (f"; not heard from: {', '.join(silent[:8])}" + (f" and {len(silent) - 8} more" if len(silent) > 8
                      else "")) if silent else "; every other rank is still heard from" if stalled else ""
        except Exception as e:  # the store itself does not answer
            others = f"; the c10d store at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} is silent ({e})"
        exit_with(f"step {self.step} ({self.phase}): {what}{others}", self.log_file, now=True)

    def barrier(self, name, most=24 * 3600):
        """Wait for every rank to reach this point, through the store rather than a collective, for waits that may
        take hours (the first verification of a corpus): as long as each rank not there yet is still heard from,
        and at most `most` seconds."""
        self.store.set(f"{name}/{self.rank}", "1")
        keys, start, pause = [f"{name}/{r}" for r in range(self.world)], time.monotonic(), 0.01
        with self.patient(f"waiting for every rank: {name}"):
            while not self.store.check(keys):
                if any(not self.store.check([keys[r]]) for r, _ in self.silent(older_than=self.limit)):
                    self.fail(f"a rank stopped before {name}")
                if time.monotonic() - start > most:
                    late = [r for r in range(self.world) if not self.store.check([keys[r]])]
                    self.fail(f"ranks {', '.join(map(str, late[:8]))} not done after {most / 3600:.0f} h")
                time.sleep(pause)
                pause = min(2 * pause, 1.0, self.beat)  # short waits end soon, long ones cost the store little

    def close(self):
        """Stop the monitor and wait for it: a daemon thread still inside a store call when the interpreter exits
        aborts the process ("terminate called without an active exception")."""
        self.done.set()
        self.thread.join()


# -----------------------------------------------------------------------------------------------------------
# out_dir


def prove_shared(out_dir, rank):
    """Rank 0 creates out_dir and writes a file of a new random name there, which every rank must read back (a name
    never looked up before cannot come from a stale cache of a network filesystem). -> this rank's problem, or None.
    Collective. Nothing stays behind: the file is removed, and out_dir too if rank 0 made it and a rank did not see
    it."""
    token, problem, made = secrets.token_hex(8), None, []
    if rank == 0:
        try:
            made = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / f".shared-{token}").write_text(socket.gethostname())
        except OSError as e:
            problem = f"out_dir {out_dir}: {e.strerror or e}"
    box = [(token, problem)]
    dist.broadcast_object_list(box)
    (token, problem0), probe = box[0], out_dir / f".shared-{box[0][0]}"
    if rank and not problem0:
        for _ in range(20):  # a few seconds for a network filesystem to show a new file
            try:
                probe.read_text()
                break
            except OSError:
                time.sleep(0.25)
        else:
            problem = (f"out_dir {out_dir} ({out_dir.resolve()}) is not the directory rank 0 writes to: the file "
                       f"rank 0 just wrote there ({probe.name}) is not here; every node must see out_dir at the same "
                       f"path on a shared filesystem")
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, problem is None and problem0 is None)
    if rank == 0:
        probe.unlink(missing_ok=True)
        if not all(seen):
            for path in made:  # deepest first
                with contextlib.suppress(OSError):
                    path.rmdir()
    return problem
