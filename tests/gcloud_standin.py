"""A stand-in for `gcloud compute tpus tpu-vm`, for scripts/launch_tpu.sh's test.

It records every call (one JSON line in $GCLOUD_STANDIN_DIR/calls.jsonl)
and plays a TPU slice on this machine: `create` remembers the accelerator,
`describe` succeeds once it exists, and `ssh --worker=all --command=CMD`
runs CMD with bash once per host of the slice, as local processes, each in
its own home folder ($GCLOUD_STANDIN_DIR/worker-<i>). Where a TPU VM's
runtime tells JAX who is who (jax.distributed finds the coordinator and its
process id from the TPU metadata), the stand-in sets what scripts/train.py
reads instead: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID,
and 4 CPU devices per host for a v4 host's 4 chips.

  usage: gcloud_standin.py compute tpus tpu-vm (create|describe|ssh|delete)
         NAME [--zone=Z] [--accelerator-type=T] [--worker=all] [--command=C]
"""

import json
import os
import socket
import subprocess
import sys

CHIPS_PER_HOST = 4


def hosts_of(accelerator: str) -> int:
  """Hosts of a v4 slice: v4-N has N TensorCores, 2 per chip, 4 chips each."""
  kind, _, cores = accelerator.partition("-")
  if kind != "v4" or not cores.isdigit():
    raise SystemExit(f"gcloud stand-in: only v4-N slices, not {accelerator}")
  return max(1, int(cores) // (2 * CHIPS_PER_HOST))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def main(argv):
  state = os.environ["GCLOUD_STANDIN_DIR"]
  os.makedirs(state, exist_ok=True)
  with open(os.path.join(state, "calls.jsonl"), "a") as f:
    f.write(json.dumps(argv) + "\n")
  if argv[:3] != ["compute", "tpus", "tpu-vm"] or len(argv) < 5:
    raise SystemExit(f"gcloud stand-in: unsupported call {argv}")
  verb, name = argv[3], argv[4]
  opts = dict(a[2:].split("=", 1) for a in argv[5:] if a.startswith("--")
              and "=" in a)
  slice_file = os.path.join(state, f"{name}.json")
  if verb == "create":
    with open(slice_file, "w") as f:
      json.dump({"accelerator": opts["accelerator-type"],
                 "version": opts.get("version")}, f)
    return 0
  if verb == "describe":
    return 0 if os.path.exists(slice_file) else 1
  if verb == "delete":
    os.remove(slice_file)
    return 0
  if verb != "ssh":
    raise SystemExit(f"gcloud stand-in: unsupported verb {verb}")
  with open(slice_file) as f:
    accelerator = json.load(f)["accelerator"]
  hosts = hosts_of(accelerator)
  workers = range(hosts) if opts.get("worker") == "all" else [
      int(opts.get("worker", 0))]
  coordinator = f"127.0.0.1:{_free_port()}"
  procs = []
  for i in workers:
    home = os.path.join(state, f"worker-{i}")
    os.makedirs(home, exist_ok=True)
    env = dict(os.environ, HOME=home, JAX_COORDINATOR_ADDRESS=coordinator,
               JAX_NUM_PROCESSES=str(hosts), JAX_PROCESS_ID=str(i),
               JAX_NUM_CPU_DEVICES=str(CHIPS_PER_HOST))
    procs.append(subprocess.Popen(["bash", "-c", opts["command"]], cwd=home,
                                  env=env))
  return max(p.wait() for p in procs)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
