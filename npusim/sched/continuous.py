"""Continuous batching: vLLM's chunked-prefill scheduler with paging, or Orca-style iteration-level
scheduling on contiguous reservations.

As vLLM v1, `schedule()` forms one iteration's `Batch` and `complete()` applies its outcome:
every running decode first (taking a page where its next token starts one, preempting the newest
running request when none is free), then prefill chunks of running requests, then swapped
requests back in, then new requests, while room and the token budget last.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from npusim.costmodel import Batch
from npusim.sched.decode_set import DecodeSet
from npusim.sched.request import Request, State
from npusim.specs import EngineConfig, ceil_div


@dataclass
class SchedulerStats:
    iterations: int = 0
    preemptions: int = 0
    output_tokens: int = 0
    batch_tokens_sum: int = 0  # tokens computed, summed over iterations
    max_batch: int = 0  # most requests in one iteration


def capacity_problem(r: Request, max_model_len: int, pool) -> str | None:
    """Why this request can never run on an instance, or None (either scheduler)."""
    total = r.prompt_len + r.output_len
    if total > max_model_len:
        return (f"prompt {r.prompt_len} + output {r.output_len} = {total} tokens exceeds "
                f"max_model_len {max_model_len}")
    return pool.capacity_problem(r)


class ContinuousScheduler:
    def __init__(self, engine: EngineConfig, pool, max_model_len: int, itl):
        self.cfg = engine
        self.pool = pool
        self.max_model_len = max_model_len
        self.itl = itl  # inter-token latencies, shared by the instances of a simulation
        self.waiting: deque[Request] = deque()
        self.swapped: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the last is preempted first
        self.prefilling: list[Request] = []  # running requests advanced one by one, admission order
        self.decoding = DecodeSet(pool)
        self.stats = SchedulerStats()
        self.it = 0  # iterations done
        self.prev_end = -1.0  # when the last iteration ended
        self.admitted = 0

    # -- arrivals ----------------------------------------------------------------------------------
    def capacity_problem(self, r: Request) -> str | None:
        return capacity_problem(r, self.max_model_len, self.pool)

    def submit(self, r: Request) -> None:
        self.waiting.append(r)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self.swapped)

    def in_system(self) -> int:
        return len(self.running) + len(self.waiting) + len(self.swapped)

    def num_running(self) -> int:
        return len(self.running)

    def holders(self) -> list[Request]:
        return self.running

    def drop_head(self) -> Request:
        """The waiting request that could not be admitted into an empty pool (schedule() gave None)."""
        return self.waiting.popleft()

    # -- forming a batch ---------------------------------------------------------------------------
    def _preempt(self, batch: Batch) -> None:
        """Preempt the newest running request: swap its pages to host memory if asked and there
        is room, else drop them to be recomputed."""
        victim = self.running.pop()
        self.stats.preemptions += 1
        victim.preemptions += 1
        if victim.state is State.DECODE:
            self.decoding.leave(victim, self.it)
            victim.t_last = self.prev_end  # a member sampled a token in every iteration it was in
        else:
            self.prefilling.remove(victim)
        moved = self.pool.swap_out(victim) if self.cfg.preemption_mode == "swap" else None
        if moved is not None:
            batch.swap_bytes += moved
            victim.state = State.SWAPPED
            self.swapped.append(victim)
            return
        self.pool.free(victim)
        victim.num_computed = 0
        victim.state = State.WAITING
        self.waiting.appendleft(victim)

    def _make_room(self, r: Request, grow, batch: Batch) -> bool:
        """grow() failed: preempt the newest running request until it succeeds; False if r itself
        was preempted."""
        while True:
            victim_is_r = self.running[-1] is r
            self._preempt(batch)
            if victim_is_r:
                return False
            if grow():
                return True

    def _admit(self, r: Request) -> None:
        self.admitted += 1
        r.seq = self.admitted
        r.state = State.PREFILL
        self.running.append(r)
        self.prefilling.append(r)

    def schedule(self) -> Batch | None:
        """The next iteration's batch; None when work waits but nothing can be admitted into an
        empty pool (the caller rejects the head request)."""
        cfg, pool, dset = self.cfg, self.pool, self.decoding
        batch = Batch()
        preempted = self.stats.preemptions
        j = self.it + 1
        for r in dset.due_pages(j):
            if r.state is State.DECODE and not dset.grant_page(r, j):  # (else preempted already)
                self._make_room(r, lambda r=r: dset.grant_page(r, j), batch)
        budget = cfg.max_num_batched_tokens - dset.n
        work = batch.scheduled
        for r in (list(self.prefilling) if self.prefilling else ()):
            if budget <= 0:
                break
            if r.state is not State.PREFILL:
                continue  # preempted while an older request took pages
            n = min(r.num_tokens - r.num_computed, budget)
            c = r.num_computed
            if not pool.grow(r, c, c + n) and not self._make_room(
                    r, lambda r=r, c=c, n=n: pool.grow(r, c, c + n), batch):
                continue
            work.append((r, n))
            budget -= n
        if self.stats.preemptions == preempted and (self.waiting or self.swapped):
            running = self.running
            # Swapped requests come back before new ones are admitted.
            while self.swapped and len(running) < cfg.max_num_seqs and budget > 0:
                r = self.swapped[0]
                n = min(r.num_tokens - r.num_computed, budget)
                moved = pool.swap_in(r, n)  # with room for what it computes at once
                if moved is None:
                    break
                self.swapped.popleft()
                batch.swap_bytes += moved
                self._admit(r)
                if not pool.grow(r, r.num_computed, r.num_computed + n):
                    break  # its next token needs a page: it goes with the running ones next time
                work.append((r, n))
                budget -= n
            while self.waiting and not self.swapped and len(running) < cfg.max_num_seqs and budget > 0:
                r = self.waiting[0]
                cached = pool.cached_tokens(r)
                if cached >= r.num_tokens:
                    cached = r.num_tokens - 1  # the last token is recomputed for its logits
                todo = r.num_tokens - cached
                if not cfg.enable_chunked_prefill and todo > budget:
                    break
                n = min(todo, budget)
                if not pool.admit(r, cached + n):
                    break
                self.waiting.popleft()
                r.num_computed = cached
                self._admit(r)
                work.append((r, n))
                budget -= n
        if not work and not dset.n:
            if self.running or self.swapped:
                return batch  # everything running was preempted away: retry next iteration
            return None
        # The decode set, plus any single token on top of a cached context (a swapped-in decode).
        decodes, ctx = dset.n, dset.context_tokens
        page = pool.page_tokens
        slots = dset.kv_slots if page else ctx
        chunks = batch.prefill_chunks
        for r, n in work:
            if n == 1 and r.num_computed:
                decodes += 1
                c = r.num_computed + 1
                ctx += c
                slots += ceil_div(c, page) * page if page else c
            else:
                chunks.append((n, r.num_computed))
        batch.num_decodes, batch.decode_context_tokens, batch.decode_kv_slots = decodes, ctx, slots
        return batch

    # -- after the iteration -----------------------------------------------------------------------
    def complete(self, batch: Batch, now: float) -> list[Request]:
        """Apply an iteration that ended at `now`: requests advance, sample and finish. Returns
        the requests that finished (their KV is freed)."""
        st = self.stats
        dset = self.decoding
        self.it += 1
        st.iterations += 1
        n = dset.n
        if n:  # every member sampled a token, one iteration after its last one
            dset.advance()
            st.output_tokens += n
            st.batch_tokens_sum += n
            self.itl.add(now - self.prev_end, n)
        done: list[Request] = []
        prev = self.prev_end
        itl = self.itl
        for r, k in batch.scheduled:  # every request scheduled on its own is in prefill
            r.num_computed += k
            st.batch_tokens_sum += k
            if r.num_computed < r.num_tokens:
                continue  # a prefill chunk that did not reach the end of the prompt
            r.out_done += 1
            r.num_tokens += 1
            st.output_tokens += 1
            if r.out_done == 1:
                r.t_first = now
            elif r.t_last == prev:
                itl.add(now - prev)
            else:
                itl.add(now - r.t_last)
            r.t_last = now
            self.prefilling.remove(r)
            if r.out_done >= r.output_len:
                done.append(r)
            else:
                dset.join(r, self.it)
        size = n + len(batch.scheduled)
        if size > st.max_batch:
            st.max_batch = size
        self.prev_end = now
        for r in dset.finishing(self.it):
            dset.leave(r, self.it)
            r.t_last = now
            done.append(r)
        for r in done:
            r.state = State.DONE
            self.running.remove(r)
            self.pool.free(r)
        return done

    def untold(self) -> int:
        return self.decoding.untold

    def check(self, batch: Batch | None = None) -> None:
        """Raise AssertionError unless the decode set's sums and the pool agree with the requests,
        between iterations or (given the batch formed for it) before one runs."""
        members = [r for r in self.running if r.state is State.DECODE]
        self.decoding.check(members, self.it, in_flight=batch is not None)
        scheduled = {r.id: n for r, n in batch.scheduled} if batch else {}
        for r in self.prefilling:
            assert r.state is State.PREFILL, f"request {r.id} prefilling in state {r.state}"
            assert self.pool.holds(r, r.num_computed + scheduled.get(r.id, 0)), \
                f"request {r.id}: a prefilling request's pool count differs from its progress"
        assert len(self.running) <= self.cfg.max_num_seqs, "more running than max_num_seqs"
        self.pool.check()


__all__ = ["ContinuousScheduler", "SchedulerStats"]
