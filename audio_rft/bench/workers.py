"""Each benchmarked variant in its own freshly spawned process, driven step by step over a pipe.

The parent-side handle (Worker) watches the child's RSS while it waits: it kills a child that passes the
memory cap, or any time the machine (shared) runs low on available memory.
"""

from __future__ import annotations

import time

from audio_rft.bench.common import bench_prompt
from audio_rft.bench.steps import VARIANTS
from audio_rft.machine import MIN_AVAILABLE_BYTES, memory_available, proc_status


def _worker(conn, variant: str, model_dir: str, G: int, seed: int, threads: int, seconds: float) -> None:
    """A fresh process holding one variant; answers ("step", L, k) messages until ("stop",)."""
    try:
        import torch
        import transformers  # noqa: F401  (counted in the import baseline, as the brief's RSS comparison needs)

        if threads:
            torch.set_num_threads(threads)
        import_rss = proc_status()["VmRSS"]
        runner = VARIANTS[variant](model_dir, G, seed)
        sample, wave = bench_prompt(runner.processor, seconds, seed)
        conn.send({"ready": True, "import_rss_bytes": import_rss, "setup_rss_bytes": proc_status()["VmRSS"],
                   "threads": torch.get_num_threads()})
        while True:
            message = conn.recv()
            if message[0] == "stop":
                break
            _, L, k = message
            began, cpu = time.perf_counter(), time.process_time()
            result = runner.step(sample, wave, L, k)
            result["step_seconds"] = time.perf_counter() - began
            result["cpu_seconds"] = time.process_time() - cpu  # all threads of the process: robust to other load
            result.update({f"{key}_bytes": value for key, value in proc_status().items()})
            conn.send(result)
    except BaseException as e:  # report, then exit
        import traceback

        conn.send({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]})
    finally:
        conn.close()


class Worker:
    """Parent-side handle of one variant's process, with a memory watchdog."""

    def __init__(self, variant: str, model_dir: str, G: int, seed: int, threads: int, seconds: float,
                 memory_cap_bytes: int):
        import multiprocessing as mp

        context = mp.get_context("spawn")
        self.conn, child = context.Pipe()
        self.variant, self.cap = variant, memory_cap_bytes
        self.process = context.Process(target=_worker, args=(child, variant, model_dir, G, seed, threads, seconds),
                                       daemon=True)
        self.process.start()
        self.max_seen = 0
        self.info: dict = {}

    def wait_ready(self, timeout: float = 900) -> dict:
        self.info = self._receive(timeout)
        return self.info

    def _receive(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.conn.poll(0.2):
                try:
                    return self.conn.recv()
                except EOFError:
                    break
            rss = proc_status(self.process.pid).get("VmRSS", 0)
            self.max_seen = max(self.max_seen, rss)
            if rss > self.cap:
                self.process.kill()
                return {"error": f"killed: RSS {rss / 2**30:.1f} GiB passed the memory cap of {self.cap / 2**30:.1f} GiB"}
            available = memory_available()
            if available is not None and available < MIN_AVAILABLE_BYTES:
                self.process.kill()  # the machine is shared: never push other people's processes into the OOM killer
                return {"error": f"killed: the machine had only {available / 2**30:.1f} GiB available "
                                 f"(worker RSS {rss / 2**30:.1f} GiB)"}
            if not self.process.is_alive():
                break
        if self.process.is_alive():
            self.process.kill()
            return {"error": f"no answer within {timeout:.0f} s; killed"}
        return {"error": f"worker exited (code {self.process.exitcode})"}

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def step(self, L: int, k: int, timeout: float = 1800) -> dict:
        if not self.alive:
            return {"error": "worker not running"}
        self.conn.send(("step", L, k))
        return self._receive(timeout)

    def close(self) -> None:
        if self.alive:
            try:
                self.conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
            self.process.join(30)
            if self.process.is_alive():
                self.process.kill()

