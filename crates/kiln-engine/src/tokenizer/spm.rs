//! SentencePiece-style tokenization (GGUF `tokenizer.ggml.model = llama`).
//!
//! The fragment (spaces already written as `▁`) starts as one symbol per
//! character; the adjacent pair whose concatenation is the best-scoring
//! vocabulary entry is merged first (ties: leftmost), until no pair forms a
//! token. A symbol left that is not a token is emitted as byte-fallback
//! tokens `<0xXX>`. Any vocabulary entry can form, control tokens included,
//! exactly as in llama.cpp.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use super::vocab::Vocab;

#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

struct Candidate {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    /// Highest score first, then leftmost.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| Reverse(self.left).cmp(&Reverse(other.left)))
    }
}

/// The byte-fallback token of each byte value.
pub(super) type ByteTokens = [Option<u32>; 256];

/// `<0xXX>` for each byte, else the one-character token, else `unk`.
pub(super) fn byte_tokens(vocab: &Vocab) -> ByteTokens {
    let mut table = [None; 256];
    for (b, slot) in (0u8..=255).zip(table.iter_mut()) {
        let hex = format!("<0x{b:02X}>");
        *slot = vocab
            .id(&hex)
            .or_else(|| {
                let mut buf = [0u8; 4];
                b.is_ascii()
                    .then(|| vocab.id(char::from(b).encode_utf8(&mut buf)))
                    .flatten()
            })
            .or(vocab.unk);
    }
    table
}

pub(super) struct SpmSession<'a> {
    vocab: &'a Vocab,
    byte_tokens: &'a ByteTokens,
    symbols: Vec<Symbol>,
    heap: BinaryHeap<Candidate>,
}

impl<'a> SpmSession<'a> {
    pub fn new(vocab: &'a Vocab, byte_tokens: &'a ByteTokens) -> Self {
        SpmSession {
            vocab,
            byte_tokens,
            symbols: Vec::new(),
            heap: BinaryHeap::new(),
        }
    }

    /// Appends the tokens of `text` (white space already escaped).
    pub fn encode(&mut self, text: &str, out: &mut Vec<u32>) {
        self.symbols.clear();
        self.heap.clear();
        let n_chars = text.chars().count();
        for (i, (start, c)) in text.char_indices().enumerate() {
            self.symbols.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: (i + 1 < n_chars).then_some(i + 1),
            });
        }
        for i in 1..self.symbols.len() {
            self.propose(text, Some(i - 1), Some(i));
        }
        while let Some(Candidate {
            left, right, size, ..
        }) = self.heap.pop()
        {
            let (Some(&l), Some(&r)) = (self.symbols.get(left), self.symbols.get(right)) else {
                continue;
            };
            if l.len == 0 || r.len == 0 || l.len + r.len != size {
                continue;
            }
            if let Some(sym) = self.symbols.get_mut(left) {
                sym.len += r.len;
                sym.next = r.next;
            }
            if let Some(sym) = self.symbols.get_mut(right) {
                sym.len = 0;
            }
            if let Some(after) = r.next.and_then(|i| self.symbols.get_mut(i)) {
                after.prev = Some(left);
            }
            self.propose(text, l.prev, Some(left));
            self.propose(text, Some(left), r.next);
        }

        let mut at = (!self.symbols.is_empty()).then_some(0);
        while let Some(i) = at {
            let Some(sym) = self.symbols.get(i) else {
                break;
            };
            let piece = text.get(sym.start..sym.start + sym.len).unwrap_or_default();
            match self.vocab.id(piece) {
                Some(id) => out.push(id),
                None => out.extend(
                    piece
                        .bytes()
                        .filter_map(|b| self.byte_tokens[usize::from(b)]),
                ),
            }
            at = sym.next;
        }
    }

    fn propose(&mut self, text: &str, left: Option<usize>, right: Option<usize>) {
        let (Some(left), Some(right)) = (left, right) else {
            return;
        };
        let (Some(l), Some(r)) = (self.symbols.get(left), self.symbols.get(right)) else {
            return;
        };
        let size = l.len + r.len;
        let Some(id) = text
            .get(l.start..l.start + size)
            .and_then(|joined| self.vocab.id(joined))
        else {
            return;
        };
        let score = self.vocab.scores.get(id as usize).copied().unwrap_or(0.0);
        self.heap.push(Candidate {
            score,
            left,
            right,
            size,
        });
    }
}
