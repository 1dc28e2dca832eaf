"""Static batching on a contiguous arena (the article's baseline): a batch is formed from the queue
(as many as fit, up to max_num_seqs), prefilled at once padded to its longest prompt, then decoded
in lockstep, finished members still occupying their rows, until its longest output is done."""

from __future__ import annotations

from collections import deque

from npusim.costmodel import Batch
from npusim.sched.continuous import SchedulerStats, capacity_problem
from npusim.sched.request import Request, State
from npusim.specs import EngineConfig


class StaticScheduler:
    def __init__(self, engine: EngineConfig, pool, max_model_len: int, itl):
        self.cfg = engine
        self.pool = pool
        self.max_model_len = max_model_len
        self.itl = itl
        self.waiting: deque[Request] = deque()
        self.batch: list[Request] = []  # the batch in flight, finished members included
        self.stats = SchedulerStats()
        self.prev_end = -1.0

    def capacity_problem(self, r: Request) -> str | None:
        return capacity_problem(r, self.max_model_len, self.pool)

    def submit(self, r: Request) -> None:
        self.waiting.append(r)

    def has_work(self) -> bool:
        return bool(self.batch or self.waiting)

    def in_system(self) -> int:
        return len(self.batch) + len(self.waiting)

    def num_running(self) -> int:
        return len(self.batch)

    def holders(self) -> list[Request]:
        return self.batch

    def drop_head(self) -> Request:
        return self.waiting.popleft()

    def schedule(self) -> Batch | None:
        members = self.batch
        if not members:
            while self.waiting and len(members) < self.cfg.max_num_seqs:
                r = self.waiting[0]
                if not self.pool.admit(r, r.prompt_len):
                    break
                self.waiting.popleft()
                r.state = State.PREFILL
                members.append(r)
            if not members:
                return None
            longest = max(r.prompt_len for r in members)  # admission filled each prompt's slots
            return Batch(prefill_chunks=[(longest, 0)] * len(members),
                         scheduled=[(r, r.prompt_len) for r in members])
        live = [r for r in members if r.out_done < r.output_len]
        width = max(r.num_computed for r in members) + 1  # padded rows read the longest context
        for r in live:
            self.pool.grow(r, r.num_computed, r.num_computed + 1)
        n = len(members)
        return Batch(num_decodes=n, decode_context_tokens=n * width, decode_kv_slots=n * width,
                     scheduled=[(r, 1) for r in live])

    def complete(self, batch: Batch, now: float) -> list[Request]:
        st = self.stats
        st.iterations += 1
        work = batch.scheduled
        if len(work) > st.max_batch:
            st.max_batch = len(work)
        prev = self.prev_end
        done = []
        for r, k in work:
            r.num_computed += k
            st.batch_tokens_sum += k
            r.out_done += 1
            r.num_tokens += 1
            st.output_tokens += 1
            if r.out_done == 1:
                r.t_first = now
            elif r.t_last == prev:
                self.itl.add(now - prev)
            else:
                self.itl.add(now - r.t_last)
            r.t_last = now
            if r.out_done >= r.output_len:
                r.state = State.DONE
                done.append(r)
        self.prev_end = now
        if done and all(r.out_done >= r.output_len for r in self.batch):
            for r in self.batch:
                self.pool.free(r)
            self.batch = []
        return done

    def untold(self) -> int:
        return 0

    def check(self, batch: Batch | None = None) -> None:
        ahead = {r.id: n for r, n in batch.scheduled} if batch and batch.num_decodes else {}
        for r in self.batch:
            assert self.pool.holds(r, r.num_computed + ahead.get(r.id, 0)), \
                f"request {r.id}: its reservation holds another count"
        self.pool.check()
