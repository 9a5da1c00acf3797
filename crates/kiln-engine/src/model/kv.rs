//! The paged KV cache: keys and values of every running sequence live in
//! fixed-size blocks taken from one pool with a byte budget.
//!
//! A block holds [`BLOCK_TOKENS`] consecutive positions of one sequence for
//! every layer, laid out `[layer][key | value][position in block][kv_dim]` as
//! `f16`. A sequence owns a [`BlockTable`]: the blocks of its positions, in
//! order. Sequences grow block by block; when the pool has no free block
//! [`KvPool::grow`] says so and the scheduler decides who waits or is
//! preempted — the pool never grows past its budget.
//!
//! Blocks are allocated from the system the first time they are used and
//! then recycled, so resident memory tracks the peak use, never more than
//! the budget. Each block has a reference count so that a computed prefix
//! can later be shared by several sequences; a block returns to the free
//! list when its last holder releases it.
//!
//! Invariants: every block id in a table is allocated (count ≥ 1); a table of
//! `len` positions holds exactly `blocks_for(len)` blocks or more (grown ahead
//! of a forward pass); the pool's allocated blocks never exceed its capacity.

use half::f16;

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

/// A pool of KV blocks for one model.
pub struct KvPool {
    layers: usize,
    kv_dim: usize,
    /// Blocks allocated so far; ids index this.
    storage: Vec<Box<[f16]>>,
    /// Holders of each allocated block; 0 means free.
    refs: Vec<u32>,
    free: Vec<u32>,
    capacity: usize,
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
            free: Vec::new(),
            capacity,
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

    /// Blocks that can still be handed out.
    pub fn free_blocks(&self) -> usize {
        self.free.len() + (self.capacity - self.storage.len())
    }

    /// Blocks held by sequences.
    pub fn used_blocks(&self) -> usize {
        self.storage.len() - self.free.len()
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
                u32::try_from(self.storage.len() - 1).ok()?
            }
            None => return None,
        };
        self.refs[id as usize] = 1;
        Some(id)
    }

    fn drop_block(&mut self, id: u32) {
        let r = &mut self.refs[id as usize];
        *r = r.saturating_sub(1);
        if *r == 0 {
            self.free.push(id);
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

    /// Returns all of `table`'s blocks to the pool and empties it.
    pub fn release(&mut self, table: &mut BlockTable) {
        for id in std::mem::take(&mut table.blocks) {
            self.drop_block(id);
        }
        table.len = 0;
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
        let v = self.offset(layer, true, slot);
        let data = &mut self.storage[block];
        for (dst, &x) in data[k..k + self.kv_dim].iter_mut().zip(key) {
            *dst = f16::from_f32(x);
        }
        for (dst, &x) in data[v..v + self.kv_dim].iter_mut().zip(value) {
            *dst = f16::from_f32(x);
        }
    }

    /// The key (or value) rows of `layer` in each of `table`'s blocks, in
    /// position order: block `b` holds positions `b·BLOCK_TOKENS..`, row `s`
    /// of it at `s·kv_dim`.
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
        let values = pool.layer_view(&t, 1, true);
        assert_eq!(keys.len(), 2);
        assert_eq!(
            keys[1][4..8].iter().map(|x| x.to_f32()).collect::<Vec<_>>(),
            [1.0, 2.0, 3.0, 4.0]
        );
        assert_eq!(values[1][4].to_f32(), 5.0);
        assert_eq!(pool.layer_view(&t, 0, false)[1][4].to_f32(), 0.0);
    }
}
