"""The decode set: running requests past their prefill, each sampling one token per iteration.

Its members all advance together, so the set is kept as sums (members, tokens attended, KV slots
read) and a member is looked at only when something happens to it: its next token needs a page,
it samples its last token, or it is preempted. An iteration then costs time in the number of such
events, not in the batch size, and gives the same schedule as advancing every member one by one.
The KV pool is told of a member's tokens only at its events (`untold` counts the rest).
"""

from __future__ import annotations

from npusim.sched.request import Request, State
from npusim.specs import ceil_div


def _by_seq(r: Request) -> int:
    return r.seq


class DecodeSet:
    def __init__(self, pool):
        self.pool = pool
        self.page = pool.page_tokens  # 0: a contiguous reservation, read exactly, never needs a page
        # page grants are the hot path at small pages: they go straight to the allocator
        self._append = pool.kv.append_slots if self.page else None
        self.n = 0
        self.context_tokens = 0  # tokens the next iteration attends: each member's cached + 1
        self.kv_slots = 0  # KV slots it reads: whole pages (paged; contiguous reads its context)
        self.untold = 0  # tokens members hold that the pool has not been told of
        self.finish_at: dict[int, list[tuple[Request, int]]] = {}  # iteration -> its last token
        self.page_at: dict[int, list[tuple[Request, int]]] = {}  # iteration -> its next page

    def join(self, r: Request, it: int) -> None:
        """r's cache caught up with its tokens in iteration `it`: from the next iteration on it
        decodes one token per iteration until it finishes."""
        r.state = State.DECODE
        r.ticket += 1
        r.joined_it, r.joined_computed, r.joined_out = it, r.num_computed, r.out_done
        r.kv_tokens = r.num_computed
        self.n += 1
        self.context_tokens += r.num_computed + 1
        last = it + r.output_len - r.out_done  # the iteration that samples its last token
        self.finish_at.setdefault(last, []).append((r, r.ticket))
        page = self.page
        if page:
            # the pages it holds; the one its next token may need is added when it is granted
            r.kv_slots = ceil_div(r.num_computed, page) * page
            self.kv_slots += r.kv_slots
            # iteration j writes token joined_computed + (j - joined_it - 1): a page boundary
            j = it + 1 + (-r.num_computed) % page
            if j <= last:
                self.page_at.setdefault(j, []).append((r, r.ticket))

    def sync(self, r: Request, it: int) -> None:
        """Bring a member's own counters up to date after iteration `it`, and the pool with them.
        A page granted for iteration it + 1 has put the pool one token ahead: that stays."""
        d = it - r.joined_it
        r.num_computed = r.joined_computed + d
        r.out_done = r.joined_out + d
        r.num_tokens = r.prompt_len + r.out_done
        untold = r.num_computed - r.kv_tokens
        if untold > 0:
            if not self.pool.grow(r, r.kv_tokens, r.num_computed):
                raise AssertionError(f"request {r.id}: {untold} decoded tokens do not fit its pages")
            self.untold -= untold
            r.kv_tokens = r.num_computed

    def leave(self, r: Request, it: int) -> None:
        """Take a member out of the set after iteration `it` (it finished, or is preempted). A
        page granted for an iteration it will not take part in is given back."""
        self.sync(r, it)
        ahead = r.kv_tokens - r.num_computed
        if ahead:
            self.pool.trim(r, ahead)
            self.untold += ahead
            r.kv_tokens = r.num_computed
        r.ticket += 1
        self.n -= 1
        self.context_tokens -= r.num_computed + 1
        self.kv_slots -= r.kv_slots

    def due_pages(self, j: int) -> list[Request]:
        """Members whose token in iteration j starts a new page, oldest first."""
        due = self.page_at.pop(j, None)
        if not due:
            return []
        if len(due) == 1:
            r, t = due[0]
            return [r] if r.ticket == t else []
        return sorted((r for r, t in due if r.ticket == t), key=_by_seq)

    def grant_page(self, r: Request, j: int) -> bool:
        """Tell the pool of r's tokens up to the one iteration j writes, which starts a new page;
        False (nothing changed) when no page is free."""
        upto = r.joined_computed + (j - r.joined_it)  # cached tokens before iteration j, plus its own
        if not self._append(r.id, upto - r.kv_tokens):
            return False
        self.untold -= upto - r.kv_tokens
        r.kv_tokens = upto
        page = self.page
        r.kv_slots += page
        self.kv_slots += page
        nxt = j + page
        if nxt <= r.joined_it + r.output_len - r.joined_out:
            self.page_at.setdefault(nxt, []).append((r, r.ticket))
        return True

    def finishing(self, it: int) -> list[Request]:
        """Members that sampled their last token in iteration `it`."""
        done = self.finish_at.pop(it, None)
        if not done:
            return []
        return [r for r, t in done if r.ticket == t]

    def advance(self) -> None:
        """An iteration ran: every member sampled a token."""
        self.context_tokens += self.n
        self.untold += self.n

    def check(self, members: list[Request], it: int, in_flight: bool) -> None:
        """Raise AssertionError unless the sums equal what the members, brought up to date one by
        one after iteration `it`, add up to, and the pool holds what each has been told of.
        In flight (iteration it + 1 formed, not run) each member's pages hold its next token too."""
        cached = [r.joined_computed + (it - r.joined_it) for r in members]
        assert self.n == len(members), "member count"
        assert self.context_tokens == sum(c + 1 for c in cached), "context sum"
        assert self.untold == sum(c - r.kv_tokens for c, r in zip(cached, members)), "untold sum"
        for c, r in zip(cached, members):
            assert self.pool.holds(r, r.kv_tokens), f"request {r.id}: pool holds another count"
        if self.page:
            p = self.page
            ahead = 1 if in_flight else 0
            assert self.kv_slots == sum(ceil_div(c + ahead, p) * p for c in cached), "KV slot sum"
