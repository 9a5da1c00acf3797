//! Special-token partition: cut special tokens out of the text before the
//! tokenizer algorithm sees it (llama.cpp's `tokenizer_st_partition`).
//!
//! Special tokens are taken one at a time, longest text first; each one is
//! cut out of every text fragment still left, leftmost occurrence first, and
//! the pieces between stay text for the shorter tokens that follow. (This is
//! not the same as leftmost-longest matching, which is why it is done this
//! way.) User-defined tokens are always cut out; control and unknown tokens
//! only where the caller allows them, which `encode` never does and
//! `encode_segments` does inside template bytes only. A token marked
//! `LSTRIP`/`RSTRIP` swallows the ASCII white space before/after it.
//!
//! To stay fast with vocabularies that have thousands of special tokens, a
//! byte trie first finds which of them occur in the text at all; only those
//! are scanned for.

use std::ops::Range;

use super::vocab::{attr, Vocab};

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Fragment {
    /// Byte range of the input still to be tokenized.
    Text(Range<usize>),
    /// A special token cut out of the input.
    Token(u32),
}

/// Where control tokens may be recognised.
pub(super) enum ControlTokens<'a> {
    /// Nowhere (plain user text).
    Never,
    /// Where every byte of the match is template text:
    /// `text_bytes_before[i]` counts the non-template bytes before byte `i`.
    InTemplate { text_bytes_before: &'a [u32] },
}

struct TrieNode {
    /// Sorted by byte.
    children: Vec<(u8, u32)>,
    /// Index into `Vocab::special_tokens` of the token ending here.
    terminal: Option<u32>,
}

/// Byte trie over the texts of all special tokens.
pub(super) struct SpecialTokenTrie {
    nodes: Vec<TrieNode>,
    first_byte: [bool; 256],
}

impl SpecialTokenTrie {
    pub fn new(vocab: &Vocab) -> SpecialTokenTrie {
        let mut trie = SpecialTokenTrie {
            nodes: vec![TrieNode {
                children: Vec::new(),
                terminal: None,
            }],
            first_byte: [false; 256],
        };
        for (rank, &id) in vocab.special_tokens.iter().enumerate() {
            let text = vocab.text(id).as_bytes();
            let (Some(&first), Ok(rank)) = (text.first(), u32::try_from(rank)) else {
                continue;
            };
            trie.first_byte[usize::from(first)] = true;
            let mut node = 0usize;
            for &b in text {
                node = trie.child_or_insert(node, b);
            }
            if let Some(n) = trie.nodes.get_mut(node) {
                // Texts are unique, so each node ends at most one token.
                n.terminal.get_or_insert(rank);
            }
        }
        trie
    }

    fn child(&self, node: usize, b: u8) -> Option<usize> {
        let children = &self.nodes.get(node)?.children;
        let at = children.binary_search_by_key(&b, |&(cb, _)| cb).ok()?;
        children.get(at).map(|&(_, n)| n as usize)
    }

    fn child_or_insert(&mut self, node: usize, b: u8) -> usize {
        if let Some(n) = self.child(node, b) {
            return n;
        }
        let new = self.nodes.len();
        self.nodes.push(TrieNode {
            children: Vec::new(),
            terminal: None,
        });
        if let Some(parent) = self.nodes.get_mut(node) {
            let at = parent
                .children
                .binary_search_by_key(&b, |&(cb, _)| cb)
                .unwrap_or_else(|at| at);
            parent.children.insert(at, (b, new as u32));
        }
        new
    }

    /// Ranks (indices into `Vocab::special_tokens`) of the tokens occurring
    /// anywhere in `text`, ascending.
    fn present(&self, text: &[u8]) -> Vec<u32> {
        let mut found = Vec::new();
        for start in 0..text.len() {
            if !text
                .get(start)
                .is_some_and(|&b| self.first_byte[usize::from(b)])
            {
                continue;
            }
            let mut node = 0usize;
            for &b in text.get(start..).unwrap_or_default() {
                let Some(next) = self.child(node, b) else {
                    break;
                };
                node = next;
                if let Some(rank) = self.nodes.get(node).and_then(|n| n.terminal) {
                    found.push(rank);
                }
            }
        }
        found.sort_unstable();
        found.dedup();
        found
    }
}

/// C `isspace` in the "C" locale.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r')
}

/// Splits `text` into text fragments and special tokens.
pub(super) fn partition(
    vocab: &Vocab,
    trie: &SpecialTokenTrie,
    text: &str,
    control: &ControlTokens<'_>,
) -> Vec<Fragment> {
    if text.is_empty() {
        return Vec::new();
    }
    let mut fragments = vec![Fragment::Text(0..text.len())];
    for rank in trie.present(text.as_bytes()) {
        let Some(&id) = vocab.special_tokens.get(rank as usize) else {
            continue;
        };
        let token_attr = vocab.attr(id);
        let is_control = token_attr & (attr::CONTROL | attr::UNKNOWN) != 0;
        if is_control && matches!(control, ControlTokens::Never) {
            continue;
        }
        let allowed = |m: Range<usize>| match control {
            _ if !is_control => true,
            ControlTokens::Never => false,
            ControlTokens::InTemplate { text_bytes_before } => {
                let count = |i: usize| text_bytes_before.get(i).copied();
                matches!((count(m.start), count(m.end)), (Some(a), Some(b)) if a == b)
            }
        };
        let needle = vocab.text(id);
        let mut next = Vec::with_capacity(fragments.len() + 2);
        for fragment in fragments {
            match fragment {
                Fragment::Text(range) => {
                    cut_out(text, range, needle, id, token_attr, &allowed, &mut next)
                }
                token => next.push(token),
            }
        }
        fragments = next;
    }
    fragments
}

/// Cuts every allowed occurrence of `needle` out of `text[range]`.
fn cut_out(
    text: &str,
    range: Range<usize>,
    needle: &str,
    id: u32,
    token_attr: u16,
    allowed: &dyn Fn(Range<usize>) -> bool,
    out: &mut Vec<Fragment>,
) {
    let bytes = text.as_bytes();
    let first_char_len = needle.chars().next().map_or(1, char::len_utf8);
    let (mut start, end) = (range.start, range.end);
    let mut search_from = start;
    while let Some(found) = text.get(search_from..end).and_then(|hay| hay.find(needle)) {
        let m = search_from + found;
        let m_end = m + needle.len();
        if !allowed(m..m_end) {
            search_from = m + first_char_len;
            continue;
        }
        let mut left_end = m;
        if token_attr & attr::LSTRIP != 0 {
            while left_end > start && bytes.get(left_end - 1).is_some_and(|&b| is_c_space(b)) {
                left_end -= 1;
            }
        }
        if left_end > start {
            out.push(Fragment::Text(start..left_end));
        }
        out.push(Fragment::Token(id));
        start = m_end;
        if token_attr & attr::RSTRIP != 0 {
            while start < end && bytes.get(start).is_some_and(|&b| is_c_space(b)) {
                start += 1;
            }
        }
        search_from = start;
    }
    if end > start {
        out.push(Fragment::Text(start..end));
    }
}
