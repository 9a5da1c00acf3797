//! Structure-aware chunking.
//!
//! Extracted text arrives as Markdown-style lines ([`crate::extract`]): `#`
//! headings, paragraphs separated by blank lines. A chunk never crosses a
//! heading: each section (the text under one heading) is cut into pieces —
//! paragraphs, else sentences (`.`, `!`, `?` before whitespace; `。`, `！`,
//! `？` anywhere; line ends), else word runs, else characters — each within
//! the token limit, and the pieces are packed greedily into chunks of at most
//! `max_tokens`. The next chunk starts with the last pieces of the previous
//! one, up to `overlap_tokens`, so a sentence near a boundary is found whole
//! in at least one chunk.
//!
//! A chunk's text is exactly the slice of the extracted text between its
//! character offsets, so a citation can quote it verbatim; the section's
//! heading path travels beside it, for indexing and for display.

use serde::{Deserialize, Serialize};

/// How big chunks are, in tokens of the knowledge base's embedding model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkOptions {
    pub max_tokens: usize,
    pub overlap_tokens: usize,
}

impl Default for ChunkOptions {
    fn default() -> Self {
        ChunkOptions {
            max_tokens: 192,
            overlap_tokens: 32,
        }
    }
}

impl ChunkOptions {
    /// Checks the options against a model that takes at most `model_max`
    /// tokens per input.
    pub fn validate(&self, model_max: usize) -> Result<(), String> {
        if self.max_tokens < 16 {
            return Err(format!(
                "chunk max_tokens is {}; it must be at least 16",
                self.max_tokens
            ));
        }
        if self.max_tokens > model_max {
            return Err(format!(
                "chunk max_tokens is {}, more than the embedding model's limit of {model_max} tokens",
                self.max_tokens
            ));
        }
        if self.overlap_tokens * 2 > self.max_tokens {
            return Err(format!(
                "chunk overlap_tokens is {}; it must be at most half of max_tokens ({})",
                self.overlap_tokens, self.max_tokens
            ));
        }
        Ok(())
    }
}

/// One chunk of a document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// The chunk's text: `source[start..end]` in characters.
    pub text: String,
    /// Character offsets in the extracted text (not bytes).
    pub start: usize,
    pub end: usize,
    /// The headings above the chunk, outermost first, joined by ` > `.
    pub heading: String,
    /// Tokens in `text` by the counter used to cut it.
    pub tokens: usize,
}

/// A slice of the text: byte range and token count.
#[derive(Debug, Clone, Copy)]
struct Piece {
    start: usize,
    end: usize,
    tokens: usize,
}

/// Cuts `text` into chunks; `count` gives the tokens in a piece of text
/// (without the model's special tokens). Whitespace-only sections give no
/// chunks.
pub fn chunk(text: &str, opts: &ChunkOptions, count: &dyn Fn(&str) -> usize) -> Vec<Chunk> {
    let max = opts.max_tokens.max(1);
    let mut chunks = Vec::new();
    let mut chars = CharOffsets::new(text);
    for section in sections(text) {
        let mut pieces = Vec::new();
        for para in paragraphs(text, section.start, section.end) {
            fit(text, para.0, para.1, max, count, &mut pieces);
        }
        pack(
            text,
            &pieces,
            opts,
            &section.heading,
            &mut chars,
            &mut chunks,
        );
    }
    chunks
}

struct Section {
    heading: String,
    start: usize,
    end: usize,
}

/// Splits the text at heading lines; each section knows its heading path.
fn sections(text: &str) -> Vec<Section> {
    let mut out = Vec::new();
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut current = Section {
        heading: String::new(),
        start: 0,
        end: 0,
    };
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let line_start = offset;
        offset += line.len();
        if let Some((level, title)) = heading(line) {
            current.end = line_start;
            out.push(current);
            stack.retain(|(l, _)| *l < level);
            stack.push((level, title.to_string()));
            current = Section {
                heading: stack
                    .iter()
                    .map(|(_, t)| t.as_str())
                    .collect::<Vec<_>>()
                    .join(" > "),
                start: offset,
                end: offset,
            };
        }
    }
    current.end = text.len();
    out.push(current);
    out.retain(|s| !text[s.start..s.end].trim().is_empty());
    out
}

/// `# Title` → (1, "Title").
fn heading(line: &str) -> Option<(usize, &str)> {
    let trimmed = line.trim_end();
    let level = trimmed.bytes().take_while(|&b| b == b'#').count();
    if !(1..=6).contains(&level) {
        return None;
    }
    let rest = &trimmed[level..];
    if !rest.starts_with(' ') {
        return None;
    }
    let title = rest.trim();
    (!title.is_empty()).then_some((level, title))
}

/// Byte ranges of the paragraphs (blank-line separated, trimmed) in
/// `text[start..end]`.
fn paragraphs(text: &str, start: usize, end: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut para: Option<(usize, usize)> = None;
    let mut offset = start;
    for line in text[start..end].split_inclusive('\n') {
        let line_start = offset;
        offset += line.len();
        if line.trim().is_empty() {
            out.extend(para.take());
            continue;
        }
        let (s, e) = trim_range(text, line_start, line_start + line.len());
        para = Some(match para {
            Some((ps, _)) => (ps, e),
            None => (s, e),
        });
    }
    out.extend(para);
    out
}

fn trim_range(text: &str, start: usize, end: usize) -> (usize, usize) {
    let slice = &text[start..end];
    let lead = slice.len() - slice.trim_start().len();
    let trail = slice.len() - slice.trim_end().len();
    if lead == slice.len() {
        return (start, start);
    }
    (start + lead, end - trail)
}

/// Pushes `text[start..end]` as pieces of at most `max` tokens: whole if it
/// fits, else split at sentence ends, then at whitespace, then anywhere.
fn fit(
    text: &str,
    start: usize,
    end: usize,
    max: usize,
    count: &dyn Fn(&str) -> usize,
    out: &mut Vec<Piece>,
) {
    let (start, end) = trim_range(text, start, end);
    if start >= end {
        return;
    }
    let tokens = count(&text[start..end]);
    if tokens <= max {
        out.push(Piece { start, end, tokens });
        return;
    }
    let sentences = sentence_ends(text, start, end);
    if sentences.len() > 1 {
        let mut s = start;
        for e in sentences {
            fit(text, s, e, max, count, out);
            s = e;
        }
        return;
    }
    let Some(mid) = split_point(&text[start..end]) else {
        // A single character over the limit: keep it rather than lose text.
        out.push(Piece { start, end, tokens });
        return;
    };
    fit(text, start, start + mid, max, count, out);
    fit(text, start + mid, end, max, count, out);
}

/// Byte offsets just after each sentence end in `text[start..end]` (the last
/// one is `end`).
fn sentence_ends(text: &str, start: usize, end: usize) -> Vec<usize> {
    let slice = &text[start..end];
    let mut ends = Vec::new();
    let mut iter = slice.char_indices().peekable();
    while let Some((i, c)) = iter.next() {
        let after = i + c.len_utf8();
        let boundary = match c {
            '。' | '！' | '？' | '\n' => true,
            '.' | '!' | '?' => iter.peek().is_none_or(|(_, n)| n.is_whitespace()),
            _ => false,
        };
        if boundary && after < slice.len() {
            ends.push(start + after);
        }
    }
    ends.push(end);
    ends.dedup();
    ends
}

/// Where to halve an over-long run: the whitespace nearest the middle, else
/// the character boundary nearest it. `None` for a single character.
fn split_point(s: &str) -> Option<usize> {
    let mid = s.len() / 2;
    let boundary = |i: usize| (0..=i).rev().find(|&j| s.is_char_boundary(j)).unwrap_or(0);
    let before = s[..boundary(mid)].rfind(char::is_whitespace);
    let after = s[boundary(mid)..]
        .find(char::is_whitespace)
        .map(|i| i + boundary(mid));
    let ws = match (before, after) {
        (Some(b), Some(a)) => Some(if mid - b <= a - mid { b } else { a }),
        (b, a) => b.or(a),
    };
    if let Some(w) = ws.filter(|&w| w > 0 && w < s.len()) {
        return Some(w);
    }
    let m = boundary(mid);
    if m > 0 {
        return Some(m);
    }
    let next = s.char_indices().nth(1).map(|(i, _)| i)?;
    Some(next)
}

/// Packs a section's pieces into chunks with overlap.
fn pack(
    text: &str,
    pieces: &[Piece],
    opts: &ChunkOptions,
    heading: &str,
    chars: &mut CharOffsets,
    out: &mut Vec<Chunk>,
) {
    let mut first = 0;
    while first < pieces.len() {
        let mut last = first;
        let mut tokens = pieces[first].tokens;
        while last + 1 < pieces.len() && tokens + pieces[last + 1].tokens <= opts.max_tokens {
            last += 1;
            tokens += pieces[last].tokens;
        }
        let (s, e) = (pieces[first].start, pieces[last].end);
        out.push(Chunk {
            text: text[s..e].to_string(),
            start: chars.at(s),
            end: chars.at(e),
            heading: heading.to_string(),
            tokens,
        });
        if last + 1 >= pieces.len() {
            break;
        }
        // Start the next chunk with trailing pieces worth at most the
        // overlap, but always move forward.
        let mut next = last + 1;
        let mut carried = 0;
        while next > first + 1 && carried + pieces[next - 1].tokens <= opts.overlap_tokens {
            next -= 1;
            carried += pieces[next].tokens;
        }
        first = next;
    }
}

/// Byte offset → character offset, for offsets that only grow (amortised
/// linear), restarting from the beginning when asked for an earlier one.
struct CharOffsets<'a> {
    text: &'a str,
    byte: usize,
    chars: usize,
}

impl<'a> CharOffsets<'a> {
    fn new(text: &'a str) -> Self {
        CharOffsets {
            text,
            byte: 0,
            chars: 0,
        }
    }

    fn at(&mut self, byte: usize) -> usize {
        if byte < self.byte {
            self.byte = 0;
            self.chars = 0;
        }
        self.chars += self.text[self.byte..byte].chars().count();
        self.byte = byte;
        self.chars
    }
}

/// Converts character offsets back to the text they delimit.
pub fn slice_chars(text: &str, start: usize, end: usize) -> Option<&str> {
    let mut idx = text.char_indices().map(|(i, _)| i).chain([text.len()]);
    let s = idx.nth(start)?;
    let e = if end >= start {
        idx.nth(end - start - 1).or((end == start).then_some(s))?
    } else {
        return None;
    };
    text.get(s..e)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A word counter: whitespace-separated words, each CJK character one
    /// token (as WordPiece does).
    fn words(s: &str) -> usize {
        s.split_whitespace()
            .map(|w| {
                let cjk = w.chars().filter(|&c| crate::analyzer::is_cjk(c)).count();
                let other = w.chars().any(|c| !crate::analyzer::is_cjk(c));
                cjk + usize::from(other)
            })
            .sum()
    }

    fn opts(max: usize, overlap: usize) -> ChunkOptions {
        ChunkOptions {
            max_tokens: max,
            overlap_tokens: overlap,
        }
    }

    #[test]
    fn chunks_follow_headings_and_quote_the_source() {
        let text = "# Guide\nIntro text here.\n\n## Install\nRun the installer. Then reboot.\n\n## Use\nOpen it.\n";
        let chunks = chunk(text, &opts(50, 0), &words);
        let got: Vec<_> = chunks
            .iter()
            .map(|c| (c.heading.as_str(), c.text.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("Guide", "Intro text here."),
                ("Guide > Install", "Run the installer. Then reboot."),
                ("Guide > Use", "Open it."),
            ]
        );
        for c in &chunks {
            assert_eq!(slice_chars(text, c.start, c.end), Some(c.text.as_str()));
        }
    }

    #[test]
    fn long_paragraphs_split_at_sentences_with_overlap() {
        let text = "One two three. Four five six. Seven eight nine. Ten eleven twelve.";
        let chunks = chunk(text, &opts(6, 3), &words);
        let got: Vec<_> = chunks.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(
            got,
            [
                "One two three. Four five six.",
                "Four five six. Seven eight nine.",
                "Seven eight nine. Ten eleven twelve.",
            ]
        );
        assert!(chunks.iter().all(|c| c.tokens <= 6));
    }

    #[test]
    fn chinese_sentences_split_at_full_width_ends() {
        let text = "知识库很有用。它能回答问题！真的吗？是的";
        let chunks = chunk(text, &opts(8, 0), &words);
        let got: Vec<_> = chunks.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(got, ["知识库很有用。", "它能回答问题！", "真的吗？是的"]);
        for c in &chunks {
            assert_eq!(slice_chars(text, c.start, c.end), Some(c.text.as_str()));
        }
    }

    #[test]
    fn a_run_without_breaks_is_cut_to_fit() {
        let text = "字".repeat(100);
        let chunks = chunk(&text, &opts(16, 0), &words);
        assert!(chunks.iter().all(|c| c.tokens <= 16));
        let joined: String = chunks.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(joined, text);
    }

    #[test]
    fn empty_and_blank_text_give_nothing() {
        assert!(chunk("", &opts(16, 0), &words).is_empty());
        assert!(chunk("\n\n   \n# Title\n\n", &opts(16, 0), &words).is_empty());
    }

    #[test]
    fn options_are_checked() {
        assert!(ChunkOptions::default().validate(256).is_ok());
        assert!(opts(300, 10).validate(256).is_err());
        assert!(opts(100, 60).validate(256).is_err());
        assert!(opts(8, 0).validate(256).is_err());
    }

    proptest! {
        #[test]
        fn every_word_lands_in_a_chunk_within_limits(
            text in "([a-z]{1,8}|[。！？.!? \n#]|知|识){0,300}",
            max in 16usize..64,
            overlap in 0usize..8,
        ) {
            let chunks = chunk(&text, &opts(max, overlap), &words);
            for c in &chunks {
                prop_assert!(c.tokens <= max, "{} tokens", c.tokens);
                prop_assert_eq!(slice_chars(&text, c.start, c.end), Some(c.text.as_str()));
            }
            // Every visible character outside heading lines is in a chunk.
            let mut covered = vec![false; text.chars().count()];
            for c in &chunks {
                covered[c.start..c.end].iter_mut().for_each(|x| *x = true);
            }
            let mut pos = 0;
            for line in text.split_inclusive('\n') {
                let n = line.chars().count();
                if heading(line).is_none() {
                    for (i, ch) in line.chars().enumerate() {
                        prop_assert!(ch.is_whitespace() || covered[pos + i], "lost {:?} at {}", ch, pos + i);
                    }
                }
                pos += n;
            }
        }
    }
}
