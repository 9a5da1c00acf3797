//! The paged KV cache: keys and values of every running sequence live in
//! fixed-size blocks taken from one pool with a byte budget.
//!
//! A block holds [`BLOCK_TOKENS`] consecutive positions of one sequence for
//! every layer as `f16`: per layer the keys `[position in block][kv_dim]`,
//! then the values transposed, `[kv_dim][position in block]`, so attention
//! reads a value dimension's positions contiguously (as ggml keeps V
//! transposed in its cache). A sequence owns a [`BlockTable`]: the blocks of its positions, in
//! order. Sequences grow block by block; when the pool has no free block
//! [`KvPool::grow`] says so and the scheduler decides who waits or is
//! preempted — the pool never grows past its budget.
//!
//! Blocks are allocated from the system the first time they are used and
//! then recycled, so resident memory tracks the peak use, never more than
//! the budget.
//!
//! **Prefix cache.** A full block's keys and values depend only on the
//! tokens of its own positions and of every position before it. Once a
//! sequence has filled a block, [`KvPool::register`] files it under an exact
//! key — tenant, the block before it, its 16 tokens — so a later sequence of
//! the same tenant whose tokens start the same way takes the block instead of
//! recomputing it ([`KvPool::attach_prefix`]). Blocks are reference-counted;
//! a filed block nobody holds stays filed and is evicted least recently used
//! first when the pool needs room. Keys name the tenant, so no sequence ever
//! attaches another tenant's block: hits, `cached_tokens` and timing say
//! nothing about other tenants' prompts. Keys are compared exactly (no
//! hashes that could collide), and each block carries a generation number,
//! bumped when it is reused, so keys that name an evicted block as their
//! predecessor never match again.
//!
//! Invariants: every block id in a table is held (count ≥ 1); a table of
//! `len` positions holds `blocks_for(len)` blocks or more (grown ahead of a
//! forward pass); the pool's allocated blocks never exceed its capacity; a
//! block's contents never change while it is filed (sequences write only at
//! positions past their attached prefix, which lie in blocks of their own).

use half::f16;
use half::slice::HalfFloatSliceExt;

/// Positions per block.
pub const BLOCK_TOKENS: usize = 16;

/// Blocks needed to hold `positions` positions.
pub fn blocks_for(positions: usize) -> usize {
    positions.div_ceil(BLOCK_TOKENS)
}

/// One sequence's blocks and how many positions of them are filled.
#[derive(Debug, Default)]
pub struct BlockTable {
    blocks: Vec<u32>,
    len: usize,
    /// Leading blocks that are filed in the prefix cache (attached or
    /// registered); registration continues from here.
    filed: usize,
    /// Registration stopped: a block with the same key was filed by another
    /// sequence first, so later blocks of this table have no key.
    unfiled_tail: bool,
}

impl BlockTable {
    pub fn new() -> BlockTable {
        BlockTable::default()
    }

    /// Positions whose keys and values are stored.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Blocks held (possibly more than the filled positions need).
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    pub(crate) fn set_len(&mut self, len: usize) {
        debug_assert!(len <= self.blocks.len() * BLOCK_TOKENS);
        self.len = len;
    }
}

/// What a filed block holds: the tenant's positions after `parent` (a block
/// and its generation, or none for the first block) with these tokens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct BlockKey {
    tenant: u32,
    parent: Option<(u32, u32)>,
    tokens: [u32; BLOCK_TOKENS],
}

/// A pool of KV blocks for one model.
pub struct KvPool {
    layers: usize,
    kv_dim: usize,
    /// Blocks allocated so far; ids index this.
    storage: Vec<Box<[f16]>>,
    /// Holders of each allocated block; 0 means free or evictable.
    refs: Vec<u32>,
    /// Bumped each time a block is handed out anew.
    generation: Vec<u32>,
    /// The key a block is filed under, if it is.
    key_of: Vec<Option<BlockKey>>,
    /// Blocks nobody holds and nothing is filed in.
    free: Vec<u32>,
    capacity: usize,
    /// The prefix cache: key -> (block, generation).
    filed: std::collections::HashMap<BlockKey, (u32, u32)>,
    /// Filed blocks nobody holds, by last use (oldest first).
    evictable: std::collections::BTreeMap<u64, u32>,
    /// Each block's place in `evictable`.
    last_use: Vec<u64>,
    clock: u64,
    tenants: std::collections::HashMap<String, u32>,
}

impl KvPool {
    /// A pool of at most `budget_bytes` of blocks for a model with `layers`
    /// layers of `kv_dim` key (and value) values per position.
    pub fn new(layers: usize, kv_dim: usize, budget_bytes: usize) -> KvPool {
        let block = Self::bytes_per_block(layers, kv_dim).max(1);
        Self::with_blocks(layers, kv_dim, budget_bytes / block)
    }

    /// A pool of exactly `capacity` blocks.
    pub fn with_blocks(layers: usize, kv_dim: usize, capacity: usize) -> KvPool {
        KvPool {
            layers,
            kv_dim,
            storage: Vec::new(),
            refs: Vec::new(),
            generation: Vec::new(),
            key_of: Vec::new(),
            free: Vec::new(),
            capacity,
            filed: Default::default(),
            evictable: Default::default(),
            last_use: Vec::new(),
            clock: 0,
            tenants: Default::default(),
        }
    }

    /// Bytes of one block for a model of this shape.
    pub fn bytes_per_block(layers: usize, kv_dim: usize) -> usize {
        layers * 2 * BLOCK_TOKENS * kv_dim * std::mem::size_of::<f16>()
    }

    pub fn block_bytes(&self) -> usize {
        Self::bytes_per_block(self.layers, self.kv_dim)
    }

    /// The most blocks the pool will ever hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Blocks that can still be handed out (free, never allocated, or
    /// filed but held by nobody).
    pub fn free_blocks(&self) -> usize {
        self.free.len() + (self.capacity - self.storage.len()) + self.evictable.len()
    }

    /// Blocks held by sequences.
    pub fn used_blocks(&self) -> usize {
        self.storage.len() - self.free.len() - self.evictable.len()
    }

    /// Filed blocks that nobody holds (kept for later hits).
    pub fn cached_blocks(&self) -> usize {
        self.evictable.len()
    }

    /// Bytes the pool has taken from the system so far.
    pub fn resident_bytes(&self) -> usize {
        self.storage.len() * self.block_bytes()
    }

    fn take_block(&mut self) -> Option<u32> {
        let id = match self.free.pop() {
            Some(id) => id,
            None if self.storage.len() < self.capacity => {
                let values = self.layers * 2 * BLOCK_TOKENS * self.kv_dim;
                self.storage
                    .push(vec![f16::ZERO; values].into_boxed_slice());
                self.refs.push(0);
                self.generation.push(0);
                self.key_of.push(None);
                self.last_use.push(0);
                u32::try_from(self.storage.len() - 1).ok()?
            }
            // Evict the least recently used filed block.
            None => {
                let (_, id) = self.evictable.pop_first()?;
                if let Some(key) = self.key_of[id as usize].take() {
                    self.filed.remove(&key);
                }
                id
            }
        };
        let i = id as usize;
        self.refs[i] = 1;
        self.generation[i] = self.generation[i].wrapping_add(1);
        Some(id)
    }

    fn drop_block(&mut self, id: u32) {
        let i = id as usize;
        self.refs[i] = self.refs[i].saturating_sub(1);
        if self.refs[i] == 0 {
            if self.key_of[i].is_some() {
                self.clock += 1;
                self.last_use[i] = self.clock;
                self.evictable.insert(self.clock, id);
            } else {
                self.free.push(id);
            }
        }
    }

    /// Holds one more reference to a filed block.
    fn hold(&mut self, id: u32) {
        let i = id as usize;
        if self.refs[i] == 0 {
            self.evictable.remove(&self.last_use[i]);
        }
        self.refs[i] += 1;
    }

    fn tenant_id(&mut self, tenant: &str) -> u32 {
        let next = self.tenants.len() as u32;
        *self.tenants.entry(tenant.to_string()).or_insert(next)
    }

    fn key(&self, tenant: u32, parent: Option<u32>, tokens: &[u32]) -> Option<BlockKey> {
        Some(BlockKey {
            tenant,
            parent: parent.map(|p| (p, self.generation[p as usize])),
            tokens: tokens.try_into().ok()?,
        })
    }

    /// Attaches to an empty `table` the longest run of filed blocks that
    /// hold `tokens`' leading positions for `tenant`, leaving at least one
    /// token to compute (its logits are needed). Returns the positions
    /// attached (a multiple of [`BLOCK_TOKENS`]).
    pub fn attach_prefix(&mut self, tenant: &str, tokens: &[u32], table: &mut BlockTable) -> usize {
        if !table.blocks.is_empty() || tokens.is_empty() {
            return 0;
        }
        let tenant = self.tenant_id(tenant);
        let most = (tokens.len() - 1) / BLOCK_TOKENS;
        let mut parent = None;
        for chunk in tokens.chunks_exact(BLOCK_TOKENS).take(most) {
            let Some(key) = self.key(tenant, parent, chunk) else {
                break;
            };
            let Some(&(id, generation)) = self.filed.get(&key) else {
                break;
            };
            if self.generation[id as usize] != generation {
                break;
            }
            self.hold(id);
            table.blocks.push(id);
            parent = Some(id);
        }
        table.filed = table.blocks.len();
        table.len = table.filed * BLOCK_TOKENS;
        table.len
    }

    /// Files every block of `table` that its filled positions complete,
    /// `tokens` being the sequence's tokens (at least `table.len()` of them).
    pub fn register(&mut self, tenant: &str, tokens: &[u32], table: &mut BlockTable) {
        let full = table.len.min(tokens.len()) / BLOCK_TOKENS;
        if table.unfiled_tail || table.filed >= full {
            return;
        }
        let tenant = self.tenant_id(tenant);
        while table.filed < full {
            let b = table.filed;
            let parent = b.checked_sub(1).map(|p| table.blocks[p]);
            let chunk = &tokens[b * BLOCK_TOKENS..(b + 1) * BLOCK_TOKENS];
            let Some(key) = self.key(tenant, parent, chunk) else {
                break;
            };
            let id = table.blocks[b];
            if self.filed.contains_key(&key) {
                // Another sequence filed the same positions first; ours stay private.
                table.unfiled_tail = true;
                return;
            }
            self.filed
                .insert(key.clone(), (id, self.generation[id as usize]));
            self.key_of[id as usize] = Some(key);
            table.filed += 1;
        }
    }

    /// Gives `table` enough blocks for `positions` positions. All or
    /// nothing: false (and no change) when the pool cannot supply them.
    pub fn grow(&mut self, table: &mut BlockTable, positions: usize) -> bool {
        let need = blocks_for(positions).saturating_sub(table.blocks.len());
        if need > self.free_blocks() {
            return false;
        }
        for _ in 0..need {
            match self.take_block() {
                Some(id) => table.blocks.push(id),
                None => return false,
            }
        }
        true
    }

    /// Returns all of `table`'s blocks to the pool and empties it; filed
    /// blocks stay in the prefix cache until evicted.
    pub fn release(&mut self, table: &mut BlockTable) {
        // Last block first, so that a prefix's head outlives its tail in
        // the LRU order (a tail is useless without its head).
        for id in std::mem::take(&mut table.blocks).into_iter().rev() {
            self.drop_block(id);
        }
        table.len = 0;
        table.filed = 0;
        table.unfiled_tail = false;
    }

    fn offset(&self, layer: usize, value: bool, slot: usize) -> usize {
        ((layer * 2 + usize::from(value)) * BLOCK_TOKENS + slot) * self.kv_dim
    }

    /// Stores the key and value rows (`kv_dim` values each) of position `pos`
    /// of `table` in `layer`. The table must have been grown to hold `pos`.
    pub(crate) fn write(
        &mut self,
        table: &BlockTable,
        layer: usize,
        pos: usize,
        key: &[f32],
        value: &[f32],
    ) {
        let block = table.blocks[pos / BLOCK_TOKENS] as usize;
        let slot = pos % BLOCK_TOKENS;
        let k = self.offset(layer, false, slot);
        let v = self.offset(layer, true, 0) + slot;
        let data = &mut self.storage[block];
        // Whole rows at a time: `half` converts a slice with one CPU check
        // (F16C where there is one), the same bits as value by value.
        let dim = self.kv_dim.min(key.len()).min(value.len());
        data[k..k + dim].convert_from_f32_slice(&key[..dim]);
        let mut column = vec![f16::ZERO; dim];
        column.convert_from_f32_slice(&value[..dim]);
        for (d, x) in column.into_iter().enumerate() {
            data[v + d * BLOCK_TOKENS] = x;
        }
    }

    /// The keys (or values) of `layer` in each of `table`'s blocks, in
    /// position order: block `b` holds positions `b·BLOCK_TOKENS..`; the key
    /// of position `s` in it starts at `s·kv_dim`, value dimension `d` of
    /// position `s` is at `d·BLOCK_TOKENS + s`.
    pub(crate) fn layer_view(&self, table: &BlockTable, layer: usize, value: bool) -> Vec<&[f16]> {
        let at = self.offset(layer, value, 0);
        let len = BLOCK_TOKENS * self.kv_dim;
        table
            .blocks
            .iter()
            .map(|&b| &self.storage[b as usize][at..at + len])
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_block_by_block_within_the_budget() {
        let bytes = KvPool::bytes_per_block(2, 8);
        let mut pool = KvPool::new(2, 8, 3 * bytes + bytes / 2);
        assert_eq!(pool.capacity(), 3);
        let mut a = BlockTable::new();
        assert!(pool.grow(&mut a, 1));
        assert!(pool.grow(&mut a, BLOCK_TOKENS));
        assert_eq!(a.blocks(), 1);
        assert!(pool.grow(&mut a, BLOCK_TOKENS + 1));
        assert_eq!(a.blocks(), 2);
        let mut b = BlockTable::new();
        // Two blocks needed, one left: nothing is taken.
        assert!(!pool.grow(&mut b, 2 * BLOCK_TOKENS));
        assert_eq!(b.blocks(), 0);
        assert_eq!(pool.free_blocks(), 1);
        pool.release(&mut a);
        assert_eq!(pool.free_blocks(), 3);
        assert!(pool.grow(&mut b, 3 * BLOCK_TOKENS));
        assert_eq!(pool.used_blocks(), 3);
        assert_eq!(pool.resident_bytes(), 3 * bytes);
    }

    #[test]
    fn rows_land_in_their_block_and_slot() {
        let mut pool = KvPool::with_blocks(2, 4, 4);
        let mut t = BlockTable::new();
        assert!(pool.grow(&mut t, BLOCK_TOKENS + 2));
        pool.write(&t, 1, BLOCK_TOKENS + 1, &[1.0, 2.0, 3.0, 4.0], &[5.0; 4]);
        t.set_len(BLOCK_TOKENS + 2);
        let keys = pool.layer_view(&t, 1, false);
        assert_eq!(keys.len(), 2);
        assert_eq!(
            keys[1][4..8].iter().map(|x| x.to_f32()).collect::<Vec<_>>(),
            [1.0, 2.0, 3.0, 4.0]
        );
        pool.write(&t, 1, BLOCK_TOKENS, &[0.0; 4], &[6.0, 7.0, 8.0, 9.0]);
        // Value dimension d of slot s at d·BLOCK_TOKENS + s.
        assert_eq!(values_at(&pool, &t, 1, 1), [5.0; 4]);
        assert_eq!(values_at(&pool, &t, 1, 0), [6.0, 7.0, 8.0, 9.0]);
        assert_eq!(pool.layer_view(&t, 0, false)[1][4].to_f32(), 0.0);
    }

    fn values_at(pool: &KvPool, t: &BlockTable, layer: usize, slot: usize) -> Vec<f32> {
        let values = pool.layer_view(t, layer, true);
        (0..4)
            .map(|d| values[1][d * BLOCK_TOKENS + slot].to_f32())
            .collect()
    }

    fn filled(pool: &mut KvPool, tenant: &str, tokens: &[u32]) -> BlockTable {
        let mut t = BlockTable::new();
        assert!(pool.grow(&mut t, tokens.len()));
        t.set_len(tokens.len());
        pool.register(tenant, tokens, &mut t);
        t
    }

    #[test]
    fn a_tenant_reuses_its_own_full_blocks_only() {
        let mut pool = KvPool::with_blocks(1, 2, 16);
        let tokens: Vec<u32> = (0..40).collect();
        let mut a = filled(&mut pool, "acme", &tokens);
        pool.release(&mut a);
        assert_eq!(pool.cached_blocks(), 2, "two full blocks stay filed");
        assert_eq!(pool.used_blocks(), 0);

        let mut same = BlockTable::new();
        assert_eq!(pool.attach_prefix("acme", &tokens, &mut same), 32);
        assert_eq!(same.len(), 32);
        assert_eq!(
            pool.cached_blocks(),
            0,
            "attached blocks are held, not evictable"
        );
        pool.release(&mut same);

        let mut other = BlockTable::new();
        assert_eq!(pool.attach_prefix("globex", &tokens, &mut other), 0);
        // A prompt of exactly one block keeps its last token to compute.
        assert_eq!(pool.attach_prefix("acme", &tokens[..16], &mut other), 0);
        let mut diverging = tokens.clone();
        diverging[20] = 999;
        assert_eq!(pool.attach_prefix("acme", &diverging, &mut other), 16);
    }

    #[test]
    fn filed_blocks_are_evicted_least_recently_used_first() {
        let mut pool = KvPool::with_blocks(1, 2, 4);
        let first: Vec<u32> = (0..33).collect();
        let second: Vec<u32> = (100..133).collect();
        let mut a = filled(&mut pool, "t", &first);
        pool.release(&mut a);
        let mut b = filled(&mut pool, "t", &second[..32]);
        pool.release(&mut b);
        assert_eq!(pool.free_blocks(), 4);
        // Two fresh blocks evict the oldest filed ones: `first`'s.
        let mut c = BlockTable::new();
        assert!(pool.grow(&mut c, 32));
        let mut t = BlockTable::new();
        assert_eq!(pool.attach_prefix("t", &first, &mut t), 0);
        assert_eq!(pool.attach_prefix("t", &second, &mut t), 32);
    }

    #[test]
    fn evicted_blocks_are_forgotten() {
        let mut pool = KvPool::with_blocks(1, 2, 3);
        let tokens: Vec<u32> = (0..33).collect();
        let mut a = filled(&mut pool, "t", &tokens[..32]);
        pool.release(&mut a);
        // Taking the whole pool evicts both filed blocks.
        let mut hog = BlockTable::new();
        assert!(pool.grow(&mut hog, 3 * BLOCK_TOKENS));
        pool.release(&mut hog);
        let mut t = BlockTable::new();
        assert_eq!(pool.attach_prefix("t", &tokens, &mut t), 0);
        // Refilling the head under the same key brings back the head only.
        let mut head = filled(&mut pool, "t", &tokens[..16]);
        pool.release(&mut head);
        let mut u = BlockTable::new();
        assert_eq!(pool.attach_prefix("t", &tokens, &mut u), 16);
    }
}
