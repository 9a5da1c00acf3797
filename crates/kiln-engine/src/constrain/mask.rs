//! Which tokens a grammar allows next.
//!
//! The vocabulary is arranged once per model in a byte trie; the allowed
//! set for a matcher state is found by walking the trie and the grammar
//! together, pruning a whole subtree at its first rejected byte. Masks are
//! cached by state (with counts that cannot matter for one token folded
//! away), so the common states — inside a string, between properties — are
//! computed once per grammar.

use std::collections::HashMap;
use std::sync::Arc;

use super::matcher::{step_all, Matcher, Stack};
use super::Grammar;
use crate::tokenizer::Tokenizer;

/// A set of token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSet {
    bits: Vec<u64>,
}

impl TokenSet {
    fn new(vocab: usize) -> TokenSet {
        TokenSet {
            bits: vec![0; vocab.div_ceil(64)],
        }
    }

    fn insert(&mut self, id: u32) {
        if let Some(w) = self.bits.get_mut(id as usize / 64) {
            *w |= 1 << (id % 64);
        }
    }

    pub fn contains(&self, id: u32) -> bool {
        self.bits
            .get(id as usize / 64)
            .is_some_and(|w| w & (1 << (id % 64)) != 0)
    }

    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|&w| w == 0)
    }

    pub fn len(&self) -> usize {
        self.bits.iter().map(|w| w.count_ones() as usize).sum()
    }
}

struct TrieNode {
    children: Vec<(u8, u32)>,
    /// Tokens whose bytes end here.
    tokens: Vec<u32>,
}

/// Tokens arranged by their bytes.
struct Trie {
    nodes: Vec<TrieNode>,
}

impl Trie {
    fn new() -> Trie {
        Trie {
            nodes: vec![TrieNode {
                children: Vec::new(),
                tokens: Vec::new(),
            }],
        }
    }

    fn insert(&mut self, id: u32, bytes: &[u8]) {
        let mut at = 0usize;
        for &b in bytes {
            at = match self.nodes[at].children.iter().find(|(c, _)| *c == b) {
                Some(&(_, child)) => child as usize,
                None => {
                    self.nodes.push(TrieNode {
                        children: Vec::new(),
                        tokens: Vec::new(),
                    });
                    let child = self.nodes.len() - 1;
                    self.nodes[at].children.push((b, child as u32));
                    child
                }
            };
        }
        self.nodes[at].tokens.push(id);
    }

    fn walk(&self, g: &Grammar, node: usize, stacks: &[Stack], set: &mut TokenSet) {
        for &(b, child) in &self.nodes[node].children {
            let next = step_all(g, stacks, b);
            if next.is_empty() {
                continue;
            }
            let child = child as usize;
            for &t in &self.nodes[child].tokens {
                set.insert(t);
            }
            self.walk(g, child, &next, set);
        }
    }
}

/// The vocabulary's text tokens by their bytes.
///
/// Most of a vocabulary is plain string content (no quote, backslash or
/// control character, whole UTF-8 characters): inside a string any such
/// token fits while the length allows, so those are kept apart in a list by
/// length and only the rest is walked there.
pub struct TokenTrie {
    all: Trie,
    /// Tokens that are not plain string content.
    special: Trie,
    /// Plain string content: `(characters, id)`, fewest characters first.
    plain: Vec<(u32, u32)>,
    vocab: usize,
    /// The longest token, in bytes.
    longest: usize,
    /// End-of-generation tokens.
    eog: Vec<u32>,
}

impl TokenTrie {
    pub fn new(tokenizer: &Tokenizer) -> TokenTrie {
        let mut all = Trie::new();
        let mut special = Trie::new();
        let mut plain = Vec::new();
        let mut longest = 0;
        for id in 0..tokenizer.vocab_size() as u32 {
            // Control tokens have no bytes: they are never text.
            let bytes = tokenizer.token_bytes(id);
            if bytes.is_empty() || tokenizer.is_control(id) {
                continue;
            }
            longest = longest.max(bytes.len());
            all.insert(id, bytes);
            match plain_chars(bytes) {
                Some(chars) => plain.push((chars, id)),
                None => special.insert(id, bytes),
            }
        }
        plain.sort_unstable();
        TokenTrie {
            all,
            special,
            plain,
            vocab: tokenizer.vocab_size(),
            longest,
            eog: tokenizer.eog_tokens().to_vec(),
        }
    }

    /// The tokens `matcher` allows next; end-of-generation tokens when the
    /// output may end here.
    pub fn allowed(&self, matcher: &Matcher) -> TokenSet {
        let mut set = TokenSet::new(self.vocab);
        let g = matcher.grammar();
        match matcher.string_room() {
            Some(room) => {
                for &(chars, id) in &self.plain {
                    if room.is_some_and(|r| chars > r) {
                        break;
                    }
                    set.insert(id);
                }
                self.special.walk(g, 0, matcher.stacks(), &mut set);
            }
            None => self.all.walk(g, 0, matcher.stacks(), &mut set),
        }
        if matcher.accepting() {
            for &t in &self.eog {
                set.insert(t);
            }
        }
        set
    }
}

/// The characters in `bytes` when they are plain string content: whole
/// UTF-8 characters, none of them `"`, `\\` or a control character.
fn plain_chars(bytes: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(bytes).ok()?;
    if text
        .chars()
        .any(|c| c == '"' || c == '\\' || (c as u32) < 0x20)
    {
        return None;
    }
    Some(text.chars().count() as u32)
}

/// Allowed sets already computed, by grammar and state. Bounded: cleared
/// when full (a cleared entry is only recomputed).
pub struct MaskCache {
    masks: HashMap<(u64, Vec<Stack>), Arc<TokenSet>>,
    capacity: usize,
}

impl MaskCache {
    pub fn new(capacity: usize) -> MaskCache {
        MaskCache {
            masks: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// The tokens `matcher` allows next, from the cache when this state was
    /// seen before.
    pub fn allowed(&mut self, trie: &TokenTrie, matcher: &Matcher) -> Arc<TokenSet> {
        let key = (matcher.grammar().id, matcher.mask_key(trie.longest as u32));
        if let Some(set) = self.masks.get(&key) {
            return set.clone();
        }
        let set = Arc::new(trie.allowed(matcher));
        if self.masks.len() >= self.capacity {
            self.masks.clear();
        }
        self.masks.insert(key, set.clone());
        set
    }
}
