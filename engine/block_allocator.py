"""CPU-side bookkeeping of one engine's KV blocks: reference counts, a free queue, and a
hash-chain -> block map over full blocks for prefix caching.

A block is in exactly one of three states:

    state    ref_count  in free queue  in hash map
    free        0           yes           no        never computed, or evicted
    cached      0           yes           yes       holds a known prefix; reusable until evicted
    in use     >= 1         no          maybe       owned by one or more live requests

`allocate` takes (and, if it was cached, evicts) from the front of the free queue. `free` puts a
block that holds a cached prefix at the back, so cached blocks leave least-recently-used first
(a sequence's blocks are freed tail first: its long suffix is evicted before the shared prefix
it started with), and a block that holds nothing reusable at the front, to be taken next: its
memory has been written, while a never-used block's pages (the CPU pool is mapped lazily) are
zero-filled by the kernel on first touch inside a step (~1.7 us a 4 KiB page; 2% of a 64-sequence
decode step of the default model while a fresh engine works through its pool).

A block's hash covers its own token ids and, through its parent's hash, every token before it,
so equal hashes mean equal prefixes (64-bit blake2b; the token ids are compared as well).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import numpy as np

NO_HASH = 0


def hash_block(parent: int, token_ids: Seq[int]) -> int:
    digest = hashlib.blake2b(
        parent.to_bytes(8, "little") + np.asarray(token_ids, dtype=np.int64).tobytes(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "little") or 1  # 0 is reserved for "no hash"


def hash_blocks(token_ids: Seq[int], block_size: int, parent: int = NO_HASH, start: int = 0) -> list[int]:
    """Hashes of the full blocks of token_ids from block index `start`, chained from `parent`."""
    hashes = []
    for i in range(start, len(token_ids) // block_size):
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size])
        hashes.append(parent)
    return hashes


@dataclass
class _Block:
    ref_count: int = 0
    hash: int = NO_HASH
    token_ids: tuple[int, ...] = ()


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._blocks = [_Block() for _ in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}  # hash -> block id
        # Cached blocks in the free queue, kept as they change: `stats` reads it every couple of
        # seconds, and counting walked the whole queue on the engine thread (15 ms at 200k blocks).
        self._num_cached = 0

    # --- counts -------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks `allocate` can hand out now: free plus evictable cached."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Evictable cached blocks (ref 0, hash known)."""
        return self._num_cached

    @property
    def num_in_use(self) -> int:
        return self.num_blocks - len(self._free)

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_count

    # --- paired verbs: allocate / free --------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks, each with ref count 1; evicts the least recently used cached blocks."""
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV blocks, {len(self._free)} free")
        ids = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self._blocks[block_id]
            if block.hash != NO_HASH:
                self._num_cached -= 1
                del self._cached[block.hash]
                block.hash, block.token_ids = NO_HASH, ()
            block.ref_count = 1
            ids.append(block_id)
        return ids

    def free(self, block_ids: Seq[int]) -> None:
        """Drop one reference to each block, tail first; unreferenced blocks become free or cached."""
        for block_id in reversed(block_ids):
            block = self._blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"double free of KV block {block_id}")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.hash == NO_HASH:
                    self._free.move_to_end(block_id, last=False)
                else:
                    self._num_cached += 1

    # --- prefix cache -------------------------------------------------------------------------

    def match_prefix(self, block_hashes: Seq[int], token_ids: Seq[int]) -> list[int]:
        """Cached blocks holding the longest prefix of token_ids (full blocks only). Takes no reference."""
        matched = []
        for i, h in enumerate(block_hashes):
            block_id = self._cached.get(h)
            if block_id is None:
                break
            tokens = tuple(token_ids[i * self.block_size : (i + 1) * self.block_size])
            if self._blocks[block_id].token_ids != tokens:
                break
            matched.append(block_id)
        return matched

    def share(self, block_ids: Seq[int]) -> None:
        """Take one more reference to each block (blocks returned by match_prefix)."""
        for block_id in block_ids:
            block = self._blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
                self._num_cached -= block.hash != NO_HASH
            block.ref_count += 1

    def cache(self, block_ids: Seq[int], block_hashes: Seq[int], token_ids: Seq[int], start: int = 0) -> None:
        """Register full, computed blocks under their hashes so later prompts can reuse them (from
        block `start` on: the ones before are registered already)."""
        if not self.enable_caching:
            return
        for i in range(start, min(len(block_ids), len(block_hashes))):
            block_id, h = block_ids[i], block_hashes[i]
            block = self._blocks[block_id]
            if block.hash != NO_HASH or h in self._cached:
                continue  # already cached, or the same prefix is cached in another block
            block.hash = h
            block.token_ids = tuple(token_ids[i * self.block_size : (i + 1) * self.block_size])
            self._cached[h] = block_id

    def reset_prefix_cache(self) -> int:
        """Forget every evictable cached prefix, so later prompts compute from scratch (blocks in
        use keep theirs); how many were forgotten. A benchmark that repeats its prompts calls it
        between rounds."""
        forgotten = [b for b in self._free if self._blocks[b].hash != NO_HASH]
        for block_id in forgotten:
            block = self._blocks[block_id]
            del self._cached[block.hash]
            block.hash, block.token_ids = NO_HASH, ()
            self._free.move_to_end(block_id, last=False)  # now holds nothing reusable: taken first, as `free` does
        self._num_cached -= len(forgotten)
        return len(forgotten)

    # --- invariants ---------------------------------------------------------------------------

    def check_invariants(self, expected_in_use: int | None = None) -> None:
        """Every block is free (ref 0, in the free queue) or referenced, never both; the hash map
        points at blocks carrying that hash; free + in use == total. With `expected_in_use`,
        also that exactly that many references are held (the owners' block tables)."""
        refs = in_use = cached = 0
        for block_id, block in enumerate(self._blocks):
            in_free = block_id in self._free
            if block.ref_count < 0 or (block.ref_count == 0) != in_free:
                raise AssertionError(f"KV block {block_id}: ref_count={block.ref_count}, in free queue={in_free}")
            refs += block.ref_count
            in_use += block.ref_count > 0
            cached += in_free and block.hash != NO_HASH
        if cached != self._num_cached:
            raise AssertionError(f"{cached} cached blocks are free, {self._num_cached} counted")
        for h, block_id in self._cached.items():
            if self._blocks[block_id].hash != h:
                raise AssertionError(f"hash map entry for block {block_id} does not match its hash")
        if len(self._free) + in_use != self.num_blocks:
            raise AssertionError("free + in use != total")
        if expected_in_use is not None and refs != expected_in_use:
            raise AssertionError(f"{refs} block references held, owners account for {expected_in_use}")
