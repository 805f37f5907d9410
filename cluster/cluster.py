"""A running cluster: Ray workers in a prefill and a decode pool (or one colocated pool) behind
the router's gRPC server (and, when asked, its OpenAI-compatible HTTP server).

`start`/`stop` are called from ordinary threads (the CLI, tests); resizing comes through the
gRPC Admin service, up to the configured pool bounds, or from the autoscaler (`autoscale`:
cluster/autoscaler.py runs the planner every interval and resizes the pools to its targets; a
manual resize then pins the pool, see `_admin_scale`). A resize only chooses under no await:
workers it adds start, and workers it removes drain, in tasks of their own, so a slow drain
never holds up a grow. The router, its gRPC and HTTP servers and
the pool management run on an asyncio loop in a thread of their own. A worker that dies (its
requests move to the live ones), or a start that fails, leaves its pool short: supervision (one
task per pool, `_supervise`) starts what is missing, and keeps trying, less and less often,
until the pool has as many ready workers as asked for. Until then the pool is short, and says
so: in `status` (each pool's target and ready workers) and in health (per pool,
router.server.POOL_HEALTH).

Draining is one path, whether a resize removes a worker or the whole cluster stops: the worker
takes nothing new, its requests finish (until a deadline; then what is left moves elsewhere, or
fails if the cluster is stopping), and its actor stops. `stop` first shuts the door (health
NOT_SERVING, new requests UNAVAILABLE), drains every worker within `shutdown_grace`, then stops
the servers and Ray; `hurry` (a second signal) ends the drain at once.

Placement: each worker is a Ray actor asking for the custom resource of its pool ("prefill"
or "decode") once the cluster has offered it, so a `ray up` cluster pins each pool to its node
type, and for `gpus_per_worker` GPUs once the cluster has had GPUs (mock workers on the CPU take
none, and one thread each). Once offered, always asked for: when every node offering a pool's
resource is lost, its replacements wait for a node that offers it (Ray's autoscaler starts one
on a `ray up` cluster) instead of landing anywhere. A local Ray is started with both resources.

Every cluster makes a random secret at start-up and hands it to its workers through their actor
constructors: each KV connection between them proves it (kv_transfer.auth).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import threading
import time
import uuid
from pathlib import Path

import ray

from cluster.autoscaler import Autoscaler
from cluster.config import ServeConfig, gpu_share
from cluster.planner import Decision, Planner
from decode_worker.worker import DecodeWorker
from engine.cost_model import load_profile
from engine.llm_engine import load_model_config
from engine.model_files import model_name, resolve_model_dir
from engine.tokenizer import load_tokenizer
from kv_transfer import new_secret
from prefill_worker.worker import PrefillWorker
from router.auth import Auth
from router.http_server import HttpServer
from router.metrics import Metrics
from router.router import Router
from router.server import ModelInfo, Server
from router.window import RequestWindow
from router.workers import Role, WorkerRecord, WorkerState

logger = logging.getLogger(__name__)

LOCAL_POOL_RESOURCES = {"prefill": 10_000, "decode": 10_000}
_REPLACE_DELAY = 1.0  # seconds before a short pool's first new worker starts (a crash loop cannot spin)
_REPLACE_BACKOFF_MAX = 60.0  # seconds between tries, at most, while no new worker can start
_POOL_RESOURCE = {Role.PREFILL: "prefill", Role.DECODE: "decode", Role.COLOCATED: "decode"}


class Cluster:
    def __init__(self, config: ServeConfig):
        self.config = config.resolve()
        self.router: Router | None = None
        self.server: Server | None = None
        self.http: HttpServer | None = None
        self.metrics: Metrics | None = None
        self.port: int | None = None
        self.http_port: int | None = None
        self.metrics_port: int | None = None
        self._started_ray = False
        self._ids = itertools.count()
        self._uid = uuid.uuid4().hex[:8]  # names this cluster's actors apart from others on the same Ray
        self._kv_secret = new_secret()  # every KV connection between this cluster's workers proves it
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pdserve-router", daemon=True)
        self.autoscaler: Autoscaler | None = None
        self._supervising: set[Role] = set()  # pools a supervision task is refilling
        self._dead: set[str] = set()  # dead workers about to leave their pool
        self._offered: set[str] = set()  # pool resources (and "GPU") the Ray cluster has offered at some point
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False
        self._hurry: asyncio.Event | None = None

    @property
    def target(self) -> str:
        return f"{self.config.host}:{self.port}"

    @property
    def base_url(self) -> str | None:
        """Where the OpenAI-compatible API listens, when it is on."""
        if self.http_port is None:
            return None
        return f"{'https' if self.config.tls else 'http'}://{self.config.host}:{self.http_port}"

    # --- lifecycle (any thread) ----------------------------------------------------------------

    def start(self) -> "Cluster":
        self._init_ray()
        self._share_gpus()
        model_dir = resolve_model_dir(self.config.engine.model)  # converts the GGUF once, before the workers race for it
        model_config = load_model_config(model_dir)
        engine = self.config.engine.resolve(model_config)
        name = self.config.served_model_name or model_name(engine.model)
        info = ModelInfo(name, engine.max_model_len, model_config.vocab_size, engine.block_size)
        self._thread.start()
        try:
            self._run(self._start(load_tokenizer(model_dir), info))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, grace: float | None = None) -> None:
        """Drain (requests in flight finish, for up to `grace` seconds: default shutdown_grace),
        then stop the workers, the server, and the Ray this cluster started."""
        if self._thread.is_alive():
            self._run(self._stop(self.config.shutdown_grace if grace is None else grace))
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    def hurry(self) -> None:
        """Cut a drain in progress short (from any thread, e.g. a second signal)."""
        if self._hurry is not None:
            self._loop.call_soon_threadsafe(self._hurry.set)

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _init_ray(self) -> None:
        if ray.is_initialized():
            return
        if self.config.address:
            ray.init(address=self.config.address, namespace="pdserve")
        else:
            # "local": always a fresh Ray of our own, never one some other process started here.
            ray.init(address="local", resources=LOCAL_POOL_RESOURCES, include_dashboard=False, namespace="pdserve",
                     object_store_memory=256 << 20)  # fmt: skip
        self._started_ray = True

    def _share_gpus(self) -> None:
        """Settle --gpus-per-worker left to us: on this machine's own Ray, workers share its GPUs
        when there are fewer than workers (a `ray up` cluster gets a GPU each: its autoscaler adds nodes)."""
        c = self.config
        if c.gpus_per_worker is not None:
            return
        gpus = 0 if c.address else ray.cluster_resources().get("GPU", 0)
        share, transfer = gpu_share(gpus, c.num_workers, c.transfer)
        if share < 1:
            logger.warning("%d workers on %g GPU(s): %.2f GPU each, KV transfer over %s (NCCL pairs distinct GPUs)",
                           c.num_workers, gpus, share, transfer)  # fmt: skip
        self.config = dataclasses.replace(c, gpus_per_worker=share, transfer=transfer)

    # --- on the router's loop ------------------------------------------------------------------

    async def _start(self, tokenizer, model: ModelInfo) -> None:
        c = self.config
        self._hurry = asyncio.Event()
        if c.metrics_port is not None:
            self.metrics = Metrics()
            self.metrics_port = self.metrics.serve(c.host, c.metrics_port)
        self.router = Router(tokenizer, model.block_size, c.router, self._workers_changed, self.metrics)
        auth = Auth.from_keys(c.api_keys, c.admin_keys)
        self.server = Server(self.router, model, c.mode, c.transfer, self._admin_scale, auth,
                             lambda: self.autoscaler.status() if self.autoscaler else None, c.engine.engine)  # fmt: skip
        tls = c.tls and (Path(c.tls_cert).read_bytes(), Path(c.tls_key).read_bytes())
        self.port = await self.server.start(c.host, c.port, tls)
        if c.http_port is not None:
            self.http = HttpServer(self.router, model, auth, c.allowed_origins)
            self.http_port = await self.http.start(c.host, c.http_port, c.tls)
        if self.metrics is not None:
            self.router._spawn(self.router.refresh_metrics())
        initial = {"colocated": c.colocated} if c.colocated else {"prefill": c.prefill, "decode": c.decode}
        await self._scale(initial)
        if c.autoscale is not None:
            self._start_autoscaler(tuple(initial), model.block_size)

    def _start_autoscaler(self, roles: tuple[str, ...], block_size: int) -> None:
        c = self.config
        profile = c.planner_profile if c.planner_profile is not None else c.engine.mock_profile
        planner = Planner(c.autoscale, load_profile(profile) if profile is not None else None)
        self.router.window = RequestWindow(time.monotonic())
        self.autoscaler = Autoscaler(planner, roles, block_size, self._snapshot, self._scale, self._decided)
        self._spawn(self.autoscaler.run())

    async def _snapshot(self) -> tuple[dict, list[dict]]:
        workers = await self.router.worker_stats()
        return {**self.router.window.take(time.monotonic()), "admission_queue": self.router.admission_queue}, workers

    def _decided(self, decision: Decision) -> None:
        if self.metrics is not None:
            for p in decision.pools:
                self.metrics.planner_targets.labels(p.role).set(p.target)
                self.metrics.planner_decisions.labels(p.role, p.direction, p.reason).inc()

    async def _stop(self, grace: float) -> None:
        self._stopping = True
        for task in list(self._tasks):  # the autoscaler, replacements: no resize from now on
            task.cancel()
        if self.server is not None:
            await self.server.shut_door()
        if self.router is not None:
            self.router.close_admission()
            deadline = time.monotonic() + grace
            drains = await asyncio.gather(*(self._drain(w, deadline) for w in list(self.router.workers.values())), return_exceptions=True)
            for error in (d for d in drains if isinstance(d, BaseException)):  # one worker's: the others' drains and the stop go on
                logger.error("draining a worker failed: %r", error)
        if self.server is not None:
            await self.server.stop(grace=1.0)
        if self.metrics is not None:
            self.metrics.stop()
        if self.http is not None:
            await self.http.stop()
        if self.router is not None:
            await self.router.stop()

    def _workers_changed(self) -> None:
        if self.server is not None:
            self._spawn(self.server.update_health())
        if self._stopping:
            return
        for worker in list(self.router.workers.values()) if self.router else ():
            if worker.state is WorkerState.DEAD and worker.id not in self._dead:
                self._dead.add(worker.id)
                self._loop.call_soon(self._bury, worker)  # not inside the router's callback

    def _spawn(self, coro) -> asyncio.Task:
        task = self._loop.create_task(coro)
        self._tasks.add(task)  # a task nobody references may be collected before it finishes
        task.add_done_callback(self._tasks.discard)
        return task

    def _bury(self, dead: WorkerRecord) -> None:
        """A dead worker (its requests have moved) leaves the pool, and supervision refills it."""
        self._dead.discard(dead.id)
        logger.warning("%s died; its pool is refilled", dead.id)
        self.router.remove_worker(dead.id)
        ray.kill(dead.handle)
        self._supervise(dead.role)

    def _supervise(self, role: Role) -> None:
        if role not in self._supervising and not self._stopping:
            self._supervising.add(role)
            self._spawn(self._refill(role))

    async def _refill(self, role: Role) -> None:
        """Supervision of a short pool (a worker died, a start failed): after a pause, so a crash
        loop cannot spin, start what is missing, and try again, less and less often, until the
        pool has its target of ready workers or the cluster stops. Workers another resize is
        starting count as on their way: they are waited for, and if their start fails, replaced."""
        delay = _REPLACE_DELAY
        try:
            while not self._stopping:
                await asyncio.sleep(delay)
                target = self.router.targets.get(role, 0)
                if self._stopping or sum(w.state is WorkerState.READY for w in self.router.of_role(role)) >= target:
                    return
                missing = target - len(self._live(role))
                if missing <= 0:
                    continue  # on their way: look again in a while
                failed = await self._outcome(self._start_workers(role, missing))
                if failed:
                    logger.error("%d of %d new %s workers did not start (%s); trying again in %.0fs", len(failed), missing, role.value,
                                 failed[0], min(delay * 2, _REPLACE_BACKOFF_MAX))  # fmt: skip
                    delay = min(delay * 2, _REPLACE_BACKOFF_MAX)
        finally:
            self._supervising.discard(role)

    async def _admin_scale(self, sizes: dict[str, int], bounds: dict[str, tuple[int | None, int | None]]) -> None:
        """The Admin service's Scale. With the planner on, a size pins its pool (bounds [n, n]) so
        the planner holds it there, and bounds given hand a pool back to the planner within them."""
        if bounds and self.autoscaler is None:
            raise ValueError("--min/--max bounds are the planner's: this cluster runs none (pdserve serve --autoscale)")
        self._check(sizes, allow_empty=bool(bounds))
        if self.autoscaler is not None:
            both = sorted(set(sizes) & set(bounds))
            if both:  # one would undo the other
                raise ValueError(f"--{both[0]} pins that pool and --min-{both[0]}/--max-{both[0]} hand it to the planner: give one or the other")
            new = {}
            for role, (low, high) in bounds.items():
                self._check({role: high} if high is not None else {}, allow_empty=True)
                current = self.autoscaler.bounds().get(role)
                if current is None:
                    raise ValueError(f"this cluster's planner sizes {' and '.join(self.autoscaler.roles)}, not {role}")
                new[role] = (current[0] if low is None else low, current[1] if high is None else high)
            self.autoscaler.set_bounds(new)  # every pool's or, if one is refused, none
            self.autoscaler.pin(sizes)
        if sizes:
            await self._scale(sizes)

    def _check(self, sizes: dict[str, int], allow_empty: bool = False) -> None:
        allowed = {"colocated"} if self.config.mode == "colocated" else {"prefill", "decode"}
        if (not sizes and not allow_empty) or set(sizes) - allowed:
            raise ValueError(f"a {self.config.mode} cluster scales {' and '.join(sorted(allowed))}, got {sorted(sizes)}")
        if any(n < 1 for n in sizes.values()):
            raise ValueError("a pool cannot shrink below one worker")
        beyond = {name: n for name, n in sizes.items() if n > self.config.pool_bounds[name]}
        if beyond:
            name, n = next(iter(beyond.items()))
            raise ValueError(f"{n} {name} workers asked for, beyond this cluster's bound of {self.config.pool_bounds[name]} "
                             f"(--max-{name})")  # fmt: skip

    async def _scale(self, sizes: dict[str, int]) -> None:
        """Resize the pools; returns once the new workers are ready and the removed ones drained.
        The choice is made with no await in it, so resizes that overlap each see the others'
        starting and draining workers. The starts and drains are the cluster's tasks: a caller
        that goes away (a cancelled Scale call) stops waiting for them, not the resize itself,
        which would leave a pool short of its target or a worker draining for ever."""
        if self._stopping:  # a planner round or a Scale that came during the stop: nothing new may start
            raise RuntimeError("the cluster is stopping")
        self._check(sizes)
        jobs: list = []
        for name, target in sizes.items():
            role = Role(name)
            self.router.set_target(role, target)
            live = self._live(role)
            # Remove the least loaded first, the newest of equals (on a `ray up` cluster, the node launched
            # for it goes idle and Ray removes it); they drain (finish their requests) before they stop.
            victims = sorted(reversed(live), key=lambda w: (len(w.requests), w.queued_tokens))[: max(0, len(live) - target)]
            for w in victims:
                self.router.set_state(w.id, WorkerState.DRAINING)
                jobs.append(self._spawn(self._remove(w)))  # at once: nothing chosen may be left undone
            jobs += self._start_workers(role, target - len(live))
        errors = await asyncio.shield(self._outcome(jobs))
        if errors:
            raise RuntimeError(f"{len(errors)} of {len(jobs)} pool changes failed: {errors[0]}") from errors[0]

    def _start_workers(self, role: Role, n: int) -> list:
        """n new workers of the role, each in the pool at once (STARTING) with a task that waits for
        it to be ready; an actor that could not even be created is its error instead of a task."""
        jobs = []
        for _ in range(n):
            try:
                jobs.append(self._spawn(self._started(self._launch(role))))
            except Exception as e:  # noqa: BLE001 - Ray refused the actor: the pool is short (and says so) until supervision fills it
                jobs.append(e)
                self._supervise(role)
        return jobs

    async def _outcome(self, jobs: list) -> list[BaseException]:
        """The errors of jobs (tasks, or errors already), once every task has ended."""
        results = await asyncio.gather(*(j for j in jobs if isinstance(j, asyncio.Future)), return_exceptions=True)
        return [r for r in (*results, *(j for j in jobs if isinstance(j, BaseException))) if isinstance(r, BaseException)]

    def _live(self, role: Role) -> list[WorkerRecord]:
        """The pool's workers that are or will be taking work (not draining, not dead)."""
        return [w for w in self.router.of_role(role) if w.state in (WorkerState.STARTING, WorkerState.READY)]

    def _launch(self, role: Role) -> WorkerRecord:
        """A new worker, starting: in the pool at once (so a resize counts it), ready later."""
        worker_id = f"{role.value}-{next(self._ids)}"
        record = WorkerRecord(worker_id, role, self._actor(role, worker_id))
        self.router.add_worker(record)
        return record

    async def _started(self, record: WorkerRecord) -> None:
        worker_id, handle = record.id, record.handle
        try:
            info = await asyncio.wait_for(handle.ready.remote(), self.config.startup_timeout)
        except BaseException as e:
            self.router.remove_worker(worker_id)
            ray.kill(handle)
            if not isinstance(e, asyncio.CancelledError):  # its pool is short now: supervision takes it from here
                self._supervise(record.role)
            if isinstance(e, asyncio.TimeoutError):
                raise RuntimeError(f"{worker_id} was not ready within {self.config.startup_timeout:.0f}s "
                                   f"(does any node offer the resources it asks for?)") from None  # fmt: skip
            raise
        if self.router.workers.get(worker_id) is not record or record.state is not WorkerState.STARTING:
            return  # a resize removed it while it started: its drain stops it
        record.node, record.node_id, record.address, record.pid = info["node"], info["node_id"], info["node_address"], info["pid"]
        record.total_blocks = info["kv_blocks"]["total"]
        record.free_blocks = info["kv_blocks"]["free"] + info["kv_blocks"]["cached"]
        record.max_num_seqs = info.get("max_num_seqs", 0)  # decode and colocated workers
        self.router.set_state(worker_id, WorkerState.READY)
        logger.info("%s ready on %s", worker_id, record.node)

    async def _remove(self, worker: WorkerRecord) -> None:
        await self._drain(worker, time.monotonic() + self.config.drain_timeout)

    async def _drain(self, worker: WorkerRecord, deadline: float) -> None:
        """The worker takes nothing new; once its requests are done (or at the deadline, or in a
        hurry: then what is left moves elsewhere, or fails if the cluster is stopping), it stops."""
        if worker.state is not WorkerState.DEAD and worker.id in self.router.workers:  # (a start cancelled by the stop has left)
            self.router.set_state(worker.id, WorkerState.DRAINING)

        def busy() -> bool:  # stopping, a prefill worker waits too for the admitted requests whose prefill has not started
            return bool(worker.requests or worker.queued_tokens or (
                self._stopping and worker.role is Role.PREFILL and self.router.awaiting_prefill()))  # fmt: skip

        while busy() and time.monotonic() < deadline and not self._hurry.is_set():
            try:
                await asyncio.wait_for(self._hurry.wait(), 0.1)
            except asyncio.TimeoutError:
                pass
        self.router.remove_worker(worker.id)
        await self._shutdown(worker)
        logger.info("%s removed", worker.id)

    async def _shutdown(self, worker: WorkerRecord) -> None:
        try:
            await asyncio.wait_for(worker.handle.shutdown.remote(), 10)
        except Exception:  # noqa: BLE001 - it is being killed anyway
            pass
        finally:  # cancelled too (the stop): the actor must not outlive its record
            ray.kill(worker.handle)

    def _actor(self, role: Role, worker_id: str):
        c = self.config
        cluster_resources = ray.cluster_resources()
        known = {*_POOL_RESOURCE.values(), "GPU"}
        self._offered |= known if c.nodes_on_demand else {name for name in known if cluster_resources.get(name, 0) > 0}
        pool = _POOL_RESOURCE[role]
        options = {"name": f"pdserve-{self._uid}-{worker_id}", "num_cpus": 0, "max_restarts": 0}
        if pool in self._offered:
            options["resources"] = {pool: 1}
        else:
            logger.warning("no node offers the %r resource: %s goes wherever Ray puts it (on a cluster whose nodes Ray's "
                           "autoscaler launches, pass --nodes-on-demand)", pool, worker_id)  # fmt: skip
        mock = c.engine.mock_profile is not None  # light workers, many per machine: one thread, a GPU only if asked
        engine = c.engine
        if "GPU" in self._offered and (not mock or c.engine.device.startswith("cuda")):
            options["num_gpus"] = c.gpus_per_worker
            if c.gpus_per_worker < 1:  # workers packed on one GPU each size their KV pool to their share of it
                engine = dataclasses.replace(engine, device_share=c.gpus_per_worker)
        threads = c.threads_per_worker
        if threads is None and mock:
            threads = 1
        elif threads is None and not c.address and not cluster_resources.get("GPU"):
            threads = max(1, (os.cpu_count() or 1) // c.num_workers)
        host = "127.0.0.1" if not c.address else "auto"
        if role is Role.PREFILL:
            return ray.remote(PrefillWorker).options(**options).remote(worker_id, engine, c.transfer, c.transfer_timeout, threads,
                                                                       kv_secret=self._kv_secret)  # fmt: skip
        return ray.remote(DecodeWorker).options(**options).remote(
            worker_id, engine, role.value, c.transfer if role is Role.DECODE else None, c.transfer_timeout, host, threads,
            reservation_timeout=c.router.prefill_timeout + c.transfer_timeout, kv_secret=self._kv_secret,
        )
