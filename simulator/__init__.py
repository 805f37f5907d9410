"""A discrete-event simulation of a pdserve cluster: the router's policies and the planner the
real cluster runs (router.policy, cluster.planner), over workers whose steps take what a cost
profile (engine.cost_model) predicts. No Ray, gRPC, asyncio or torch.

    from simulator import SimConfig, Simulation
    result = Simulation(SimConfig(prefill=2, decode=2), profile, planner=None).run(requests)
"""

from simulator.config import EngineSpec, SimConfig
from simulator.simulation import Simulation, SimResult

__all__ = ["EngineSpec", "SimConfig", "SimResult", "Simulation"]
