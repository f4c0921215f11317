"""Continuous-batching scheduler: which sequences compute which tokens in the next step.

Every step builds one mixed batch under two budgets, `max_num_batched_tokens` and `max_num_seqs`:
first the running sequences (a decode is one token; a prefill still in progress gets its next chunk),
oldest first, then waiting sequences in arrival order, admitted while their blocks fit (prefix-cache
hits count as already computed). Long prompts are prefilled in chunks across steps. When a running
sequence needs a block and none is free, the newest running sequence is preempted by recompute: its
blocks are freed and it returns to the front of the waiting queue with its generated tokens kept.
Optionally (`admission_group` > 1, used with CUDA graphs, where a step with any prefill runs eagerly
and costs many decode steps) a step that would be decode-only holds admissions until a group of
seats is free, or until the head of the queue has been held `max_admission_hold` steps.
A request that could never fit (prompt not shorter than max_model_len, or more blocks than the cache
holds) fails alone at admission, so any admitted sequence can always finish once it runs by itself.

A step has two halves: `launched(batch)` once the runner has queued it (its tokens count as computed,
each sampling sequence gets a pending token), and `update(batch, sampled)` once its tokens are on the
host. The engine may schedule and launch the next step in between (asynchronous scheduling: the host
plans step n+1 while the device runs step n); a sequence that then turns out to have stopped (EOS)
drops the token it computed in the extra step. Stops by length are known at launch, so a sequence
whose last token is in flight is not scheduled again.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from porter.engine.block_manager import BlockManager
from porter.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]  # tokens each sequence computes this step
    # sequence i reaches its last token this step (its prefill finishes, or it decodes): it samples
    sample: list[bool] = None

    def __post_init__(self):
        if self.sample is None:
            self.sample = [s.num_computed_tokens + n == s.num_tokens for s, n in zip(self.seqs, self.num_new_tokens)]

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_decode_only(self) -> bool:
        return all(n == 1 for n in self.num_new_tokens)

    def samples(self, i: int) -> bool:
        return self.sample[i]


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        eos_token_ids: set[int] | frozenset = frozenset(),
        admission_group: int = 1,
        max_admission_hold: int = 16,
    ):
        if max_num_seqs < 1 or max_num_batched_tokens < 1 or admission_group < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens and admission_group must be >= 1")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = set(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.admission_group = admission_group
        self.max_admission_hold = max_admission_hold
        self._held_steps = 0
        self.num_preemptions = 0

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> bool:
        """Queue seq; a request that can never run is finished at once with an error (returns False)."""
        error = self._admission_error(seq)
        if error:
            seq.finish("error", error)
            return False
        self.waiting.append(seq)
        return True

    def _admission_error(self, seq: Sequence) -> str | None:
        n = seq.num_prompt_tokens
        if n == 0:
            return "empty prompt: at least one token is needed"
        if n >= self.max_model_len:
            return (f"prompt has {n} tokens but max_model_len is {self.max_model_len}: "
                    f"it must be shorter to leave room for one generated token")
        # K/V is stored for every token but the last generated one
        kv_tokens = min(n + seq.params.max_tokens, self.max_model_len) - 1
        need = self.block_manager.blocks_needed(kv_tokens)
        if need > self.block_manager.num_blocks:
            return (f"request needs {need} KV blocks ({kv_tokens} tokens) but the cache holds only "
                    f"{self.block_manager.num_blocks}: raise num_kv_blocks or lower max_tokens / max_model_len")
        return None

    # --- one step -------------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        bm = self.block_manager
        seqs: list[Sequence] = []
        counts: list[int] = []
        budget = self.max_num_batched_tokens
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.last_in_flight:
                i += 1
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not bm.can_append(seq):
                victim = self.running.pop()  # newest; never one already scheduled (those precede i)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                bm.append(seq)
                seqs.append(seq)
                counts.append(n)
                budget -= n
                i += 1

        # no admissions in a step that had to preempt: the freed blocks go to the running sequences
        hold = preempted or self._hold_admissions(counts)
        while self.waiting and not hold and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_pending or not bm.can_allocate(seq):  # preempted with a token in flight: next step
                break
            bm.allocate(seq)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            seqs.append(seq)
            counts.append(n)
            budget -= n

        if not seqs and self.has_unfinished() and not self._any_pending():
            raise RuntimeError("scheduler made no progress (no sequence could be scheduled): this is a bug")
        return ScheduledBatch(seqs, counts)  # empty while every unfinished sequence waits on a step in flight

    def _any_pending(self) -> bool:
        return any(s.num_pending for s in self.running) or any(s.num_pending for s in self.waiting)

    def _hold_admissions(self, counts: list[int]) -> bool:
        """Keep a decode-only step decode-only until enough seats are free for a group of prefills."""
        if self.admission_group == 1 or not self.waiting or not counts or any(n > 1 for n in counts):
            self._held_steps = 0
            return False
        want = min(len(self.waiting), self.admission_group)
        if self.max_num_seqs - len(self.running) >= want or self._held_steps >= self.max_admission_hold:
            self._held_steps = 0
            return False
        self._held_steps += 1
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def launched(self, batch: ScheduledBatch) -> None:
        """The runner has queued `batch`: its tokens count as computed, each sampling sequence gets a
        pending token, and a sequence whose pending token is its last by length is not scheduled again."""
        for seq, n, smp in zip(batch.seqs, batch.num_new_tokens, batch.sample):
            seq.num_computed_tokens += n
            if smp:
                seq.append_pending()
                if (seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len):
                    seq.last_in_flight = True

    def update(self, batch: ScheduledBatch, sampled: list[int], logprobs: list[dict[int, float] | None] | None = None
               ) -> list[Sequence]:
        """Apply a launched step's results: `sampled[j]` is the token of the j-th sampling sequence of
        the batch. Returns the sequences that finished."""
        sampling = [seq for seq, smp in zip(batch.seqs, batch.sample) if smp]
        if len(sampling) != len(sampled):
            raise ValueError(f"{len(sampled)} sampled tokens for {len(sampling)} sampling sequences")
        finished = []
        for j, (seq, token) in enumerate(zip(sampling, sampled)):
            if seq.is_finished:  # stopped on an earlier token while this step was in flight
                continue
            seq.resolve_token(token, logprobs[j] if logprobs is not None else None)
            reason = self._stop_reason(seq, token)
            if reason:
                (self.waiting if seq.status is SequenceStatus.WAITING else self.running).remove(seq)
                seq.drop_pending()
                seq.finish(reason)
                if seq.block_table:
                    self.block_manager.free(seq)
                finished.append(seq)
        for seq in batch.seqs:  # every token before num_computed_tokens is known now
            if seq.block_table and not seq.is_finished:
                self.block_manager.cache_computed_blocks(seq)
        return finished

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        """Why seq stops at `token`, its newest known token (pending tokens after it do not count)."""
        params = seq.params
        if (not params.ignore_eos and token in self.eos_token_ids) or (
            params.stop_token_ids and token in params.stop_token_ids
        ):
            return "stop"
        known = len(seq.token_ids)
        if known - seq.num_prompt_tokens >= params.max_tokens or known >= self.max_model_len:
            return "length"
        return None

    def abort_all(self, reason: str) -> list[Sequence]:
        """Fail every unfinished sequence (the model step raised): free their blocks."""
        failed = []
        for seq in list(self.running) + list(self.waiting):
            if seq.block_table:
                self.block_manager.free(seq)
            seq.finish("error", reason)
            failed.append(seq)
        self.running.clear()
        self.waiting.clear()
        return failed
