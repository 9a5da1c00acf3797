//! How text becomes full-text terms, for documents and queries alike.
//!
//! Words of alphabetic scripts are split at anything that is not a letter or
//! digit, lowercased and stemmed with the English Snowball stemmer. Chinese,
//! Japanese and Korean have no spaces between words and no dictionary here,
//! so a run of such characters becomes its overlapping character bigrams
//! (`机器学习` → `机器`, `器学`, `学习`; a lone character stays a unigram), as
//! Lucene's CJK analyzer does: a query matches a passage sharing its bigrams,
//! whatever the word boundaries are.

use tantivy::tokenizer::{
    Language, LowerCaser, RemoveLongFilter, Stemmer, TextAnalyzer, Token, TokenStream, Tokenizer,
};

/// The name the analyzer is registered under in an index.
pub const NAME: &str = "kiln_text";

/// Terms longer than this (in bytes) are dropped: they are junk (base64,
/// hashes), not words.
const MAX_TERM_BYTES: usize = 48;

/// The analyzer for full-text fields and queries.
pub fn analyzer() -> TextAnalyzer {
    TextAnalyzer::builder(MixedScriptTokenizer)
        .filter(RemoveLongFilter::limit(MAX_TERM_BYTES))
        .filter(LowerCaser)
        .filter(Stemmer::new(Language::English))
        .build()
}

/// The terms `text` is indexed (or queried) as.
pub fn terms(text: &str) -> Vec<String> {
    let mut analyzer = analyzer();
    let mut stream = analyzer.token_stream(text);
    let mut out = Vec::new();
    while stream.advance() {
        out.push(stream.token().text.clone());
    }
    out
}

/// Whether `c` belongs to a script written without spaces between words.
pub fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x3040..=0x30FF          // Hiragana, Katakana
        | 0x3400..=0x4DBF        // CJK Extension A
        | 0x4E00..=0x9FFF        // CJK Unified Ideographs
        | 0xAC00..=0xD7AF        // Hangul syllables
        | 0xF900..=0xFAFF        // CJK Compatibility Ideographs
        | 0x20000..=0x2FA1F      // Extensions B-F, compatibility supplement
    )
}

/// Splits text into words and CJK bigrams.
#[derive(Clone, Copy, Debug, Default)]
pub struct MixedScriptTokenizer;

impl Tokenizer for MixedScriptTokenizer {
    type TokenStream<'a> = MixedScriptStream<'a>;

    fn token_stream<'a>(&'a mut self, text: &'a str) -> MixedScriptStream<'a> {
        MixedScriptStream {
            text,
            pos: 0,
            cjk_run: None,
            token: Token::default(),
            position: 0,
        }
    }
}

/// A run of CJK characters being cut into bigrams: where the next bigram
/// starts, and where the run ends.
#[derive(Clone, Copy, Debug)]
struct CjkRun {
    next: usize,
    end: usize,
    emitted: bool,
}

pub struct MixedScriptStream<'a> {
    text: &'a str,
    /// Byte offset where scanning continues (after the current run).
    pos: usize,
    cjk_run: Option<CjkRun>,
    token: Token,
    position: usize,
}

impl MixedScriptStream<'_> {
    fn emit(&mut self, from: usize, to: usize) {
        self.token.offset_from = from;
        self.token.offset_to = to;
        self.token.text.clear();
        self.token.text.push_str(&self.text[from..to]);
        self.token.position = self.position;
        self.token.position_length = 1;
        self.position += 1;
    }

    /// The next bigram (or lone unigram) of the current CJK run.
    fn next_in_run(&mut self) -> bool {
        let Some(mut run) = self.cjk_run else {
            return false;
        };
        let rest = &self.text[run.next..run.end];
        let mut chars = rest.char_indices();
        let Some((_, first)) = chars.next() else {
            self.cjk_run = None;
            return false;
        };
        let second_end = chars.next().map(|(i, c)| run.next + i + c.len_utf8());
        match second_end {
            Some(end) => {
                let start = run.next;
                run.next += first.len_utf8();
                run.emitted = true;
                self.cjk_run = Some(run);
                self.emit(start, end);
                true
            }
            None if !run.emitted => {
                self.cjk_run = None;
                self.emit(run.next, run.end);
                true
            }
            None => {
                self.cjk_run = None;
                false
            }
        }
    }
}

impl TokenStream for MixedScriptStream<'_> {
    fn advance(&mut self) -> bool {
        loop {
            if self.next_in_run() {
                return true;
            }
            let rest = &self.text[self.pos..];
            let Some(start_rel) = rest.find(|c: char| c.is_alphanumeric()) else {
                self.pos = self.text.len();
                return false;
            };
            let start = self.pos + start_rel;
            let first = self.text[start..].chars().next().unwrap_or(' ');
            let cjk = is_cjk(first);
            let len = self.text[start..]
                .find(|c: char| !c.is_alphanumeric() || is_cjk(c) != cjk)
                .unwrap_or(self.text.len() - start);
            let end = start + len;
            self.pos = end;
            if cjk {
                self.cjk_run = Some(CjkRun {
                    next: start,
                    end,
                    emitted: false,
                });
                continue;
            }
            self.emit(start, end);
            return true;
        }
    }

    fn token(&self) -> &Token {
        &self.token
    }

    fn token_mut(&mut self) -> &mut Token {
        &mut self.token
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn english_words_are_lowercased_and_stemmed() {
        assert_eq!(
            terms("The Running dogs, ran-quickly! 42x"),
            ["the", "run", "dog", "ran", "quick", "42x"]
        );
    }

    #[test]
    fn chinese_becomes_bigrams() {
        assert_eq!(terms("机器学习"), ["机器", "器学", "学习"]);
        assert_eq!(terms("我"), ["我"]);
        assert_eq!(
            terms("用GPU训练模型。好"),
            ["用", "gpu", "训练", "练模", "模型", "好"]
        );
    }

    #[test]
    fn offsets_point_into_the_text() {
        let text = "Ça va? 知识库 ok";
        let mut a = analyzer();
        let mut s = a.token_stream(text);
        let mut spans = Vec::new();
        while s.advance() {
            let t = s.token();
            spans.push(&text[t.offset_from..t.offset_to]);
        }
        assert_eq!(spans, ["Ça", "va", "知识", "识库", "ok"]);
    }

    #[test]
    fn junk_is_harmless() {
        assert!(terms("").is_empty());
        assert!(terms(" ,.;!? \n\t。！？").is_empty());
        let long = "a".repeat(200);
        assert!(terms(&long).is_empty());
    }
}
