r"""Runs N processes of ``experiments.train`` on this machine, joined by ``jax.distributed``.

    python launch/local.py --num_processes=2 -- --config=experiments/configs/mqar.py \
        --workdir=/tmp/mqar_2proc --config.num_train_steps=100

Every process gets ``--coordinator_address=127.0.0.1:<free port> --num_processes=N
--process_id=i`` and the arguments after ``--``; together the processes form one global mesh
(``config.mesh``). On a CPU each process has ``--cpu_devices_per_process`` devices (XLA's fake
host devices); on a GPU node ``--gpus_per_process=K`` gives process ``i`` the GPUs ``i*K ..
i*K+K-1`` through ``CUDA_VISIBLE_DEVICES``. Output lines are prefixed with ``[i]``. SIGINT and
SIGTERM are forwarded to every process (each saves a checkpoint and exits, see
``experiments/trainer.py``); if one process fails, the others are terminated. The exit status is
the first non-zero status of a process, or 0.

Uses the standard library only, so it runs before any dependency is installed.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _pump(stream, prefix):
  for line in iter(stream.readline, ""):
    sys.stdout.write(f"{prefix}{line}")
    sys.stdout.flush()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
  parser.add_argument("--cpu_devices_per_process", type=int, default=1,
                      help="fake CPU devices per process (XLA_FLAGS), for CPU-only machines")
  parser.add_argument("--gpus_per_process", type=int, default=0,
                      help="GPUs per process via CUDA_VISIBLE_DEVICES (0: leave the variable alone)")
  parser.add_argument("--module", default="experiments.train", help="python -m module to run")
  parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the trainer's flags")
  args = parser.parse_args(argv)
  if args.num_processes < 1:
    parser.error(f"--num_processes must be >= 1, got {args.num_processes}")
  train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
  port = args.port or free_port()

  procs, pumps = [], []
  for i in range(args.num_processes):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    if args.gpus_per_process:
      k = args.gpus_per_process
      env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in range(i * k, (i + 1) * k))
    else:
      flags = [f for f in env.get("XLA_FLAGS", "").split()
               if not f.startswith("--xla_force_host_platform_device_count")]
      flags.append(f"--xla_force_host_platform_device_count={args.cpu_devices_per_process}")
      env["XLA_FLAGS"] = " ".join(flags)
    cmd = [sys.executable, "-m", args.module, f"--coordinator_address=127.0.0.1:{port}",
           f"--num_processes={args.num_processes}", f"--process_id={i}", *train_args]
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, bufsize=1)
    procs.append(p)
    t = threading.Thread(target=_pump, args=(p.stdout, f"[{i}] "), daemon=True)
    t.start()
    pumps.append(t)

  def forward(signum, frame):
    del frame
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)

  status = 0
  kill_at = None
  running = set(range(len(procs)))
  while running:
    for i in sorted(running):
      rc = procs[i].poll()
      if rc is None:
        continue
      running.discard(i)
      if rc != 0 and status == 0:
        status = rc
        print(f"[launch] process {i} exited with status {rc}; stopping the others", flush=True)
        for j in running:
          procs[j].terminate()
        # A process blocked in a collective with the dead one never reaches its SIGTERM check.
        kill_at = time.monotonic() + 30
    if kill_at is not None and time.monotonic() > kill_at:
      for j in running:
        procs[j].kill()
      kill_at = None
    time.sleep(0.1)
  for t in pumps:
    t.join(timeout=5)
  return status


if __name__ == "__main__":
  sys.exit(main())
