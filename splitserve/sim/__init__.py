"""A calibrated discrete-event simulator of a SplitServe deployment, and a planner on it.

Pure Python, no torch (the profiler alone, `splitserve.sim.profiler`, runs the engine):
  profile.py    the measured profile (JSON) and the step-time model fitted from it
  scheduler.py  one worker's engine: the real Scheduler's token-budget rules on counters
  cluster.py    the event loop: arrivals, the router's real policy functions, workers' steps,
                KV transfers; bench metrics records out
  speed.py      the host's speed: its drift between periods, and the run's level
  probe.py      the speed probe a profile and a sweep both take (an engine of its own)
  sweep.py      `splitserve bench simulate`: a `bench disagg` sweep, predicted vs measured
  planner.py    `splitserve plan`: P:D counts searched for goodput per device under an SLO
  route_bench.py `splitserve bench route`: routing decisions/s over 1,000 simulated workers
"""
