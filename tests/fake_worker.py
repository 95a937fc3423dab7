"""A stand-in for selattn.main that launch_test.py starts through launch/local.py.

It takes the flags the launcher adds, joins the multi-process JAX job on CPU and sums an array that is sharded over
every process's devices (jax's default CPU collectives, gloo, carry the all-reduce). `--fail_process` and
`--wait_for_signal` exercise the launcher's failure and signal paths.
"""

import argparse
import os
import pathlib
import sys
import time


def _sum_over_all_processes(args) -> None:
  import jax  # pylint: disable=g-import-not-at-top  # only this mode needs jax; the others start faster without
  import numpy as np  # pylint: disable=g-import-not-at-top

  jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  k = jax.local_device_count()
  assert jax.process_count() == args.num_processes, jax.process_count()
  assert jax.device_count() == args.num_processes * k, (jax.device_count(), k)
  assert int(os.environ['JAX_NUM_CPU_DEVICES']) == k, (os.environ['JAX_NUM_CPU_DEVICES'], k)

  # Row r of the global (devices, 3) array holds r on every column; each process supplies only its own rows.
  mesh = jax.make_mesh((jax.device_count(),), ('data',), axis_types=(jax.sharding.AxisType.Explicit,))
  sharding = jax.sharding.NamedSharding(mesh, jax.P('data'))
  rows = np.arange(args.process_id * k, (args.process_id + 1) * k, dtype=np.float32)
  local = np.repeat(rows[:, None], 3, axis=1)
  x = jax.make_array_from_process_local_data(sharding, local)
  assert x.shape == (jax.device_count(), 3), x.shape
  # Both outputs are replicated, so they need every process's rows: a cross-process all-reduce and all-gather.
  replicated = jax.sharding.NamedSharding(mesh, jax.P())
  total, column = jax.jit(lambda a: (a.sum(), a[:, 0]), out_shardings=(replicated, replicated))(x)
  # Reading a replicated array waits only for the shard it reads; a process that then exits can leave a peer's
  # other devices stuck forever connecting their gloo communicator. So wait for every local shard first.
  jax.block_until_ready((total, column))
  gathered = np.asarray(column).astype(int).tolist()
  print(f'RESULT process={args.process_id} sum={float(total)} gathered={gathered}', flush=True)
  jax.distributed.shutdown()


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument('--coordinator_address', required=True)
  p.add_argument('--num_processes', type=int, required=True)
  p.add_argument('--process_id', type=int, required=True)
  p.add_argument('--workdir', default='')
  p.add_argument('--fail_process', type=int, default=-1, help='this process exits with code 3; the others hang')
  p.add_argument('--wait_for_signal', default='', help='directory: write ready/saved marker files there')
  args = p.parse_args()
  print(f'process {args.process_id} started with {" ".join(sys.argv[1:])}', flush=True)

  if args.fail_process >= 0:
    import jax  # pylint: disable=g-import-not-at-top

    jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    if args.process_id == args.fail_process:
      print('fake failure: something went wrong', flush=True)
      # Not sys.exit: JAX's atexit shutdown would wait (shutdown_timeout_seconds, 300 s) for the healthy
      # processes to finish too, so the launcher would not see the failure for minutes.
      os._exit(3)
    time.sleep(120)  # the launcher must stop this process, not wait for it
  elif args.wait_for_signal:
    # The pattern a trainer uses to checkpoint on SIGTERM: JAX's preemption service catches the signal and every
    # process learns the same step at which to save.
    import jax  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    marks = pathlib.Path(args.wait_for_signal)
    (marks / f'ready_{args.process_id}').touch()
    step = 0
    while not multihost_utils.reached_preemption_sync_point(step):
      step += 1
      time.sleep(0.01)
    (marks / f'saved_{args.process_id}_step_{step}').touch()
  else:
    _sum_over_all_processes(args)


if __name__ == '__main__':
  main()
