"""Data-parallel calibration on torch.distributed (gloo on CPU, nccl on CUDA).

Each rank runs every world-th batch of the calibration windows (`calibration.batches`); the
statistics are then reduced exactly, on every rank: maxima with all_reduce MAX, float64 sums and
int64 counts with SUM, top-k entries and kept rows gathered and put back in batch order. Kept rows
are drawn per (seed, batch, tensor), so they are the very rows a one-process run keeps. Rank 0
mitigates, quantizes and writes; the other ranks write nothing.

    outlierq calibrate --nproc 2 ...        (or: torchrun --nproc-per-node 2 -m outlierq calibrate ...)
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import torch
import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> None:
    """Join the process group torchrun describes in the environment (no-op without one)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if "TORCHELASTIC_RUN_ID" in os.environ:  # under torchrun (each rank in its own session): die with it
            die_with_parent()
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def is_writer() -> bool:
    return rank_world()[0] == 0


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Linux: ask the kernel to send `sig` to this process when its parent dies (even by SIGKILL),
    so no launched process outlives the `outlierq` that started it. A no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the request: act on it now
        os.kill(os.getpid(), sig)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Launched:
    """The ranks, owned: one process group of our making; SIGINT/SIGTERM/SIGHUP to us are
    forwarded to it (the handlers are set before the first rank starts, so none is lost); each rank
    dies with us, SIGKILL included (`die_with_parent`)."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []
        self.signals: list[int] = []
        self.stopping = False  # once set, what the ranks print is dropped: the launcher says it in one line
        self.relays: list = []

    def forward(self, signum, frame) -> None:
        self.signals.append(signum)
        self.stopping = True
        self.kill(signum)

    def relay(self, proc: subprocess.Popen) -> None:
        """Pass a rank's stderr through until the run is stopped. (A rank stopped inside a native
        callback can die with a C++ 'terminate' and a traceback, e.g. in Triton's nanobind layer:
        not the user's business once the launcher has said why the run stopped.)"""
        import codecs
        import threading

        def pump():
            dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
            for chunk in iter(lambda: os.read(proc.stderr.fileno(), 1 << 16), b""):
                if not self.stopping:
                    sys.stderr.write(dec.decode(chunk))
                    sys.stderr.flush()
            proc.stderr.close()

        t = threading.Thread(target=pump, daemon=True)
        t.start()
        self.relays.append(t)

    def kill(self, sig: int) -> None:
        if self.procs:
            try:
                os.killpg(self.procs[0].pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def wait(self) -> int:
        """The first non-zero exit code (the other ranks are then stopped), else 0."""
        rc = 0
        live = list(self.procs)
        while live:
            for p in list(live):
                try:
                    code = p.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    continue
                live.remove(p)
                if code != 0 and rc == 0:
                    rc = code
                    self.stopping = code < 0 or code > 128  # (a rank killed: the launcher says it)
                    self.kill(signal.SIGTERM)  # a rank failed: the others would wait on it forever
        return rc


def launch(nproc: int, argv: list[str]) -> int:
    """Run `python -m outlierq <argv>` as `nproc` ranks on this machine (what torchrun's
    --standalone does, without a supervisor process whose own shutdown prints tracebacks); each rank
    gets an equal share of the CPU threads. Returns the first failing rank's exit code, or 128 +
    the signal that stopped the run, after every rank has gone."""
    threads = max(1, (os.cpu_count() or 1) // nproc)
    base = dict(os.environ, OMP_NUM_THREADS=str(threads), MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(_free_port()), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                OUTLIERQ_LAUNCHED="1")
    run = _Launched()
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, run.forward) for s in sigs}
    try:
        for r in range(nproc):
            if run.signals:
                break
            pgid = run.procs[0].pid if run.procs else 0

            def child(pgid=pgid):
                os.setpgid(0, pgid)  # rank 0 leads a new group; the others join it
                die_with_parent()

            env = dict(base, RANK=str(r), LOCAL_RANK=str(r))
            run.procs.append(subprocess.Popen([sys.executable, "-m", "outlierq", *argv], env=env,
                                              preexec_fn=child, stderr=subprocess.PIPE))
            run.relay(run.procs[-1])
        if run.signals:  # arrived while the ranks were starting
            run.kill(run.signals[0])
        rc = run.wait()
    finally:
        if any(p.poll() is None for p in run.procs):  # (an exception while waiting)
            run.kill(signal.SIGKILL)
            for p in run.procs:
                p.wait()
        for s, h in old.items():
            signal.signal(s, h)
        for t in run.relays:
            t.join(timeout=5)
    if run.signals:
        name = signal.Signals(run.signals[0]).name
        print(f"outlierq: interrupted ({name}); stopped the {nproc} processes, nothing was written", file=sys.stderr)
        return 128 + int(run.signals[0])
    if rc < 0 or rc > 128:  # a rank stopped by a signal sent to it alone (the OOM killer, a user)
        sig = -rc if rc < 0 else rc - 128
        print(f"outlierq: a rank was stopped by signal {sig}; stopped the others, nothing was written",
              file=sys.stderr)
        return 128 + sig
    return rc


def _reduce(tensors: list[torch.Tensor], op) -> list[torch.Tensor]:
    """One collective over many tensors of one dtype: flatten, reduce, split back."""
    if not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=op)
    return list(torch.split(flat, [t.numel() for t in tensors]))


@torch.no_grad()
def reduce_recorder(rec, my_batches: list[int]) -> None:
    """Make every rank's calibration recorder hold the statistics of all ranks' batches."""
    tables = [(t, n) for t in (rec.inputs, rec.residual) for n in t]
    stats = [t[n] for t, n in tables]
    for field, op in (("absmax", dist.ReduceOp.MAX), ("abssum", dist.ReduceOp.SUM),
                      ("counts", dist.ReduceOp.SUM), ("token_hist", dist.ReduceOp.SUM)):
        parts = _reduce([getattr(s, field) for s in stats], op)
        for s, p in zip(stats, parts):
            setattr(s, field, p.reshape(getattr(s, field).shape).clone())
    if rec.value_hists:  # the same names on every rank (the rotated Linears), zeros where idle
        hists = _reduce(list(rec.value_hists.values()), dist.ReduceOp.SUM)
        rec.value_hists = {n: h.clone() for n, h in zip(rec.value_hists, hists)}
    tokens = torch.tensor([s.tokens for s in stats], dtype=torch.int64)
    dist.all_reduce(tokens)
    mine = {"top": [(s.top_values, s.top_where) for s in stats], "fired": rec.fired,
            "experts": rec.expert_tokens, "batches": my_batches, "samples": rec.samples,
            "hessian_owner": rec.hessian_owner}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    for i, s in enumerate(stats):
        s.tokens = int(tokens[i])
        s.top_values, s.top_where = s.top_values[:0], s.top_where[:0]
        for other in everyone:
            s._merge_top(*other["top"][i])
    rec.fired = {n: sum(o["fired"].get(n, 0) for o in everyone) for t, n in tables}
    experts: dict[str, torch.Tensor] = {}
    for o in everyone:
        for k, v in o["experts"].items():
            experts[k] = experts.get(k, 0) + v
    rec.expert_tokens = experts
    # kept rows: one part per batch for every Linear input; back in batch order. Linears that
    # share one tensor (q/k/v) keep sharing it (pickle keeps identity within one object).
    order = sorted((b, r, j) for r, o in enumerate(everyone) for j, b in enumerate(o["batches"]))
    names = dict.fromkeys(n for o in everyone for n in o["samples"])
    by_first: dict[int, list] = {}
    rec.samples = {}
    for name in names:
        parts = [everyone[r]["samples"][name][j] for b, r, j in order]
        rec.samples[name] = by_first.setdefault(id(parts[0]), parts)
    # Hessians: a sum over batches, so one all-reduce; a rank that ran no batch adds zeros
    rec.hessian_owner = {k: v for o in everyone for k, v in o["hessian_owner"].items()}
    owners = sorted(set(rec.hessian_owner.values()))
    if owners:
        mine_h = [rec.hessians.get(o, torch.zeros(rec.inputs[o].absmax.numel(), rec.inputs[o].absmax.numel(),
                                                  dtype=torch.float64)) for o in owners]
        summed = _reduce(mine_h, dist.ReduceOp.SUM)
        rec.hessians = {o: h.reshape(m.shape).clone() for o, h, m in zip(owners, summed, mine_h)}
