//! Byte-level BPE (GGUF `tokenizer.ggml.model = gpt2`).
//!
//! A text fragment is split into words by the pre-tokenizer, each word is
//! spelled with GPT-2's byte characters, and then adjacent symbols are merged
//! lowest merge rank first (ties: leftmost), exactly as llama.cpp does: a
//! merge applies whenever its pair has a rank, whether or not the result is a
//! token. A final symbol that is not a token falls back to its bytes, of
//! which only those that are themselves tokens are emitted.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::pretokenize::PreTokenizer;
use super::unicode::ByteChars;
use super::vocab::Vocab;

/// One symbol of a word: a byte range of the encoded word, linked to its
/// neighbours. `len == 0` means it was merged into its left neighbour.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge; ordered so the heap pops the lowest rank, then the
/// leftmost pair.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Candidate {
    key: Reverse<(u32, usize)>,
    right: usize,
    /// Combined length when proposed; a mismatch later means it is stale.
    size: usize,
}

pub(super) struct BpeSession<'a> {
    vocab: &'a Vocab,
    byte_chars: &'a ByteChars,
    pre: PreTokenizer,
    ignore_merges: bool,
    word: String,
    key: String,
    symbols: Vec<Symbol>,
    heap: BinaryHeap<Candidate>,
}

impl<'a> BpeSession<'a> {
    pub fn new(
        vocab: &'a Vocab,
        byte_chars: &'a ByteChars,
        pre: PreTokenizer,
        ignore_merges: bool,
    ) -> Self {
        BpeSession {
            vocab,
            byte_chars,
            pre,
            ignore_merges,
            word: String::new(),
            key: String::new(),
            symbols: Vec::new(),
            heap: BinaryHeap::new(),
        }
    }

    /// Appends the tokens of one text fragment (no special tokens in it).
    pub fn encode(&mut self, text: &str, out: &mut Vec<u32>) {
        for word in self.pre.split(text) {
            self.word.clear();
            self.byte_chars.encode_into(word, &mut self.word);
            if self.ignore_merges {
                if let Some(id) = self.vocab.id(&self.word) {
                    out.push(id);
                    continue;
                }
            }
            self.merge_word();
            self.emit_word(out);
        }
    }

    fn merge_word(&mut self) {
        self.symbols.clear();
        self.heap.clear();
        let n_chars = self.word.chars().count();
        for (i, (start, c)) in self.word.char_indices().enumerate() {
            self.symbols.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: (i + 1 < n_chars).then_some(i + 1),
            });
        }
        for i in 1..self.symbols.len() {
            self.propose(Some(i - 1), Some(i));
        }
        while let Some(Candidate {
            key: Reverse((_, left)),
            right,
            size,
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
            self.propose(l.prev, Some(left));
            self.propose(Some(left), r.next);
        }
    }

    fn propose(&mut self, left: Option<usize>, right: Option<usize>) {
        let (Some(left), Some(right)) = (left, right) else {
            return;
        };
        let (Some(l), Some(r)) = (self.symbols.get(left), self.symbols.get(right)) else {
            return;
        };
        let (Some(lt), Some(rt)) = (
            self.word.get(l.start..l.start + l.len),
            self.word.get(r.start..r.start + r.len),
        ) else {
            return;
        };
        self.key.clear();
        self.key.push_str(lt);
        self.key.push(' ');
        self.key.push_str(rt);
        if let Some(&rank) = self.vocab.merges.get(self.key.as_str()) {
            self.heap.push(Candidate {
                key: Reverse((rank, left)),
                right,
                size: l.len + r.len,
            });
        }
    }

    fn emit_word(&self, out: &mut Vec<u32>) {
        for sym in self.symbols.iter().filter(|s| s.len > 0) {
            let Some(text) = self.word.get(sym.start..sym.start + sym.len) else {
                continue;
            };
            if let Some(id) = self.vocab.id(text) {
                out.push(id);
                continue;
            }
            // Only bytes that are tokens on their own survive (llama.cpp looks
            // each byte up as a one-byte string).
            let mut buf = [0u8; 4];
            for &b in text.as_bytes() {
                if b.is_ascii() {
                    let single: &str = char::from(b).encode_utf8(&mut buf);
                    if let Some(id) = self.vocab.id(single) {
                        out.push(id);
                    }
                }
            }
        }
    }
}
