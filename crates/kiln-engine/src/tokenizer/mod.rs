//! Tokenizers built from GGUF metadata, producing the same token ids as
//! llama.cpp.
//!
//! Two algorithms are supported: SentencePiece-style (`tokenizer.ggml.model =
//! llama`, e.g. Gemma) in [`spm`], and byte-level BPE (`gpt2`, e.g. SmolLM2,
//! Qwen, Llama 3) in [`bpe`] with the pre-tokenizers of [`pretokenize`].
//! Both run after the special-token partition of [`partition`]. Vocabulary
//! loading and llama.cpp's rules for special tokens live in [`vocab`].
//!
//! Two entry points differ only in which special tokens they recognise:
//! [`Tokenizer::encode`] treats its input as user text (user-defined tokens
//! are cut out, control tokens never are), and [`Tokenizer::encode_segments`]
//! recognises control tokens inside template segments, so a chat template's
//! markers become control tokens while a user typing `<|im_end|>` does not.
//!
//! Decoding is per token ([`Tokenizer::token_bytes`]): the bytes a token adds
//! to the output, empty for control tokens; no text clean-up is applied.

mod bpe;
mod partition;
mod pretokenize;
mod spm;
mod unicode;
mod unicode_tables;
mod vocab;

use candle_core::quantized::gguf_file::Content;

use self::bpe::BpeSession;
use self::partition::{partition, ControlTokens, Fragment, SpecialTokenTrie};
use self::spm::{ByteTokens, SpmSession};
use self::unicode::ByteChars;
use self::vocab::{attr, Algorithm, Vocab};

/// A piece of a rendered chat prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Segment<'a> {
    /// Text written by the chat template: control tokens are recognised.
    Template(&'a str),
    /// Text from a message: control tokens are not recognised.
    Text(&'a str),
}

/// A tokenizer for one model; immutable, `Send + Sync`.
pub struct Tokenizer {
    vocab: Vocab,
    trie: SpecialTokenTrie,
    byte_chars: ByteChars,
    spm_byte_tokens: ByteTokens,
    /// Concatenated decoded bytes of every token; token `i` owns
    /// `piece_bytes[piece_offsets[i]..piece_offsets[i + 1]]`.
    piece_bytes: Vec<u8>,
    piece_offsets: Vec<usize>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("algorithm", &self.vocab.algorithm)
            .field("vocab_size", &self.vocab.tokens.len())
            .field("bos", &self.vocab.bos)
            .field("eos", &self.vocab.eos)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Builds the tokenizer from a GGUF file's `tokenizer.ggml.*` metadata.
    /// Missing, malformed or unsupported metadata is [`crate::EngineError::Metadata`].
    pub fn from_gguf(content: &Content) -> crate::Result<Self> {
        let vocab = Vocab::from_gguf(content)?;
        let trie = SpecialTokenTrie::new(&vocab);
        let byte_chars = ByteChars::new();
        let spm_byte_tokens = spm::byte_tokens(&vocab);
        let mut piece_bytes = Vec::new();
        let mut piece_offsets = Vec::with_capacity(vocab.tokens.len() + 1);
        piece_offsets.push(0);
        for id in 0..vocab.tokens.len() {
            let id = u32::try_from(id).unwrap_or(u32::MAX);
            append_piece(&vocab, &byte_chars, id, &mut piece_bytes);
            piece_offsets.push(piece_bytes.len());
        }
        Ok(Tokenizer {
            vocab,
            trie,
            byte_chars,
            spm_byte_tokens,
            piece_bytes,
            piece_offsets,
        })
    }

    /// Tokenizes user text. Control tokens are never recognised (a user
    /// typing `<|im_end|>` gets ordinary text tokens); user-defined tokens
    /// are, as in llama.cpp with `parse_special = false`.
    pub fn encode(&self, text: &str, add_bos: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        self.push_bos(add_bos, &mut out);
        let fragments = partition(&self.vocab, &self.trie, text, &ControlTokens::Never);
        self.encode_fragments(text, &fragments, &mut out);
        out
    }

    /// Tokenizes a rendered chat template. Control tokens are recognised only
    /// inside [`Segment::Template`] pieces; the pieces between two special
    /// tokens are tokenized as one fragment, so the result equals llama.cpp's
    /// tokenization of the concatenated string with `parse_special = true`
    /// whenever the [`Segment::Text`] pieces contain no special-token text.
    pub fn encode_segments(&self, segments: &[Segment<'_>], add_bos: bool) -> Vec<u32> {
        let total: usize = segments.iter().map(|s| segment_str(s).len()).sum();
        let mut text = String::with_capacity(total);
        let mut text_bytes_before = Vec::with_capacity(total + 1);
        let mut count = 0u32;
        for segment in segments {
            let (s, is_text) = match segment {
                Segment::Template(s) => (*s, false),
                Segment::Text(s) => (*s, true),
            };
            text.push_str(s);
            for _ in 0..s.len() {
                text_bytes_before.push(count);
                count = count.saturating_add(u32::from(is_text));
            }
        }
        text_bytes_before.push(count);

        let mut out = Vec::with_capacity(total / 3 + 2);
        self.push_bos(add_bos, &mut out);
        let control = ControlTokens::InTemplate {
            text_bytes_before: &text_bytes_before,
        };
        let fragments = partition(&self.vocab, &self.trie, &text, &control);
        self.encode_fragments(&text, &fragments, &mut out);
        out
    }

    fn push_bos(&self, add_bos: bool, out: &mut Vec<u32>) {
        if add_bos {
            if let Some(bos) = self.vocab.bos {
                out.push(bos);
            }
        }
    }

    fn encode_fragments(&self, text: &str, fragments: &[Fragment], out: &mut Vec<u32>) {
        match self.vocab.algorithm {
            Algorithm::Spm => {
                let mut session = SpmSession::new(&self.vocab, &self.spm_byte_tokens);
                let mut escaped = String::new();
                // The space prefix goes on text that starts the input or
                // follows a special token.
                let mut after_special = true;
                for fragment in fragments {
                    match fragment {
                        Fragment::Text(range) => {
                            escaped.clear();
                            if self.vocab.add_space_prefix && after_special {
                                escaped.push('▁');
                            }
                            for c in text.get(range.clone()).unwrap_or_default().chars() {
                                escaped.push(if c == ' ' { '▁' } else { c });
                            }
                            session.encode(&escaped, out);
                            after_special = false;
                        }
                        Fragment::Token(id) => {
                            out.push(*id);
                            after_special = true;
                        }
                    }
                }
            }
            Algorithm::Bpe { pre, ignore_merges } => {
                let mut session =
                    BpeSession::new(&self.vocab, &self.byte_chars, pre, ignore_merges);
                for fragment in fragments {
                    match fragment {
                        Fragment::Text(range) => {
                            session.encode(text.get(range.clone()).unwrap_or_default(), out)
                        }
                        Fragment::Token(id) => out.push(*id),
                    }
                }
            }
        }
    }

    /// Whether llama.cpp adds BOS to a prompt for this model.
    pub fn add_bos_by_default(&self) -> bool {
        self.vocab.add_bos && self.vocab.bos.is_some()
    }

    pub fn bos(&self) -> Option<u32> {
        self.vocab.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.vocab.eos
    }

    /// Whether generating `id` ends the turn (EOS, end-of-turn markers, ...).
    pub fn is_eog(&self, id: u32) -> bool {
        self.vocab.eog.binary_search(&id).is_ok()
    }

    /// All end-of-generation tokens, ascending.
    pub fn eog_tokens(&self) -> &[u32] {
        &self.vocab.eog
    }

    pub fn is_control(&self, id: u32) -> bool {
        self.vocab.attr(id) & attr::CONTROL != 0
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab.tokens.len()
    }

    /// Bytes this token contributes to decoded text (`▁` -> space, `<0xXX>`
    /// -> that byte, GPT-2 byte characters -> bytes); empty for control and
    /// unknown tokens and for ids outside the vocabulary. A token may end in
    /// the middle of a UTF-8 character.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        let i = id as usize;
        match (self.piece_offsets.get(i), self.piece_offsets.get(i + 1)) {
            (Some(&a), Some(&b)) => self.piece_bytes.get(a..b).unwrap_or_default(),
            _ => &[],
        }
    }

    /// Lossy UTF-8 of the tokens' concatenated [`Tokenizer::token_bytes`].
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            bytes.extend_from_slice(self.token_bytes(id));
        }
        match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }
    }

    /// The token's raw vocabulary text ("" outside the vocabulary).
    pub fn token_str(&self, id: u32) -> &str {
        self.vocab.text(id)
    }

    /// The id of the token whose raw vocabulary text is `piece`.
    pub fn token_id(&self, piece: &str) -> Option<u32> {
        self.vocab.id(piece)
    }
}

fn segment_str<'a>(segment: &Segment<'a>) -> &'a str {
    match *segment {
        Segment::Template(s) | Segment::Text(s) => s,
    }
}

/// Appends what llama.cpp's `token_to_piece(special = false)` gives for `id`.
fn append_piece(vocab: &Vocab, byte_chars: &ByteChars, id: u32, out: &mut Vec<u8>) {
    let a = vocab.attr(id);
    let text = vocab.text(id);
    if a & (attr::CONTROL | attr::UNKNOWN) != 0 {
        return;
    }
    if a & attr::USER_DEFINED != 0 {
        out.extend_from_slice(text.as_bytes());
    } else if a & attr::NORMAL != 0 {
        match vocab.algorithm {
            Algorithm::Spm => out.extend_from_slice(text.replace('▁', " ").as_bytes()),
            Algorithm::Bpe { .. } => {
                for c in text.chars() {
                    match byte_chars.byte_of(c) {
                        Some(b) => out.push(b),
                        // Not a byte character: keep it as it is.
                        None => {
                            let mut buf = [0u8; 4];
                            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                        }
                    }
                }
            }
        }
    } else if a & attr::BYTE != 0 {
        // `<0xXX>`
        if let Some(b) = text
            .get(3..5)
            .and_then(|hex| u8::from_str_radix(hex, 16).ok())
        {
            out.push(b);
        }
    }
}

#[cfg(test)]
mod tests;
