//! A BERT WordPiece tokenizer built from a HuggingFace `tokenizer.json`,
//! reproducing the `tokenizers` library's pipeline id for id:
//!
//! 1. added tokens that match on raw text (`[CLS]`, `[SEP]`, ... with
//!    `normalized: false`) are split out first, leftmost-longest;
//! 2. each remaining piece goes through `BertNormalizer`: drop NUL, U+FFFD and
//!    control/format/private-use characters, map whitespace to a space, put
//!    spaces around CJK ideographs, strip accents (NFD, then drop nonspacing
//!    marks), lowercase;
//! 3. added tokens with `normalized: true` are split out of the normalized text;
//! 4. `BertPreTokenizer` splits on whitespace (dropped) and punctuation (kept
//!    as one-character words);
//! 5. WordPiece: greedy longest-match-first with the `##` continuation prefix;
//!    a word with no full cover, or longer than `max_input_chars_per_word`
//!    characters, becomes one `[UNK]`;
//! 6. the post-processor's single-sequence template wraps the ids
//!    (`[CLS] ... [SEP]` for BERT).
//!
//! Character classes use the same Unicode tables as `tokenizers`
//! (`unicode_categories`, `unicode-normalization-alignments`), so the two
//! agree on every character, not just on common ones.
//!
//! Invariant: every id this tokenizer emits is a value of the file's vocab or
//! added tokens, and [`WordPieceTokenizer::max_id`] bounds them all.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;
use unicode_categories::UnicodeCategories;
use unicode_normalization_alignments::UnicodeNormalization;

use crate::bert::config::read_json;
use crate::error::{EngineError, Result};

/// The parts of `tokenizer.json` this tokenizer reads.
#[derive(Deserialize)]
struct TokenizerFile {
    #[serde(default)]
    added_tokens: Vec<AddedTokenFile>,
    normalizer: Option<Value>,
    pre_tokenizer: Option<Value>,
    post_processor: Option<Value>,
    model: WordPieceFile,
}

#[derive(Deserialize)]
struct AddedTokenFile {
    id: u32,
    content: String,
    #[serde(default)]
    single_word: bool,
    #[serde(default)]
    lstrip: bool,
    #[serde(default)]
    rstrip: bool,
    #[serde(default)]
    normalized: bool,
}

#[derive(Deserialize)]
struct WordPieceFile {
    #[serde(rename = "type")]
    kind: Option<String>,
    vocab: HashMap<String, u32>,
    unk_token: String,
    #[serde(default = "default_prefix")]
    continuing_subword_prefix: String,
    #[serde(default = "default_max_chars")]
    max_input_chars_per_word: usize,
}

fn default_prefix() -> String {
    "##".to_string()
}
fn default_max_chars() -> usize {
    100
}

#[derive(Deserialize)]
struct BertNormalizerFile {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default = "yes")]
    clean_text: bool,
    #[serde(default = "yes")]
    handle_chinese_chars: bool,
    #[serde(default)]
    strip_accents: Option<bool>,
    #[serde(default = "yes")]
    lowercase: bool,
}

fn yes() -> bool {
    true
}

/// `BertNormalizer` with `strip_accents` resolved (HF: unset means "same as
/// lowercase").
#[derive(Debug, Clone, Copy)]
struct BertNormalizer {
    clean_text: bool,
    handle_chinese_chars: bool,
    strip_accents: bool,
    lowercase: bool,
}

/// A tokenizer for one BERT model. Immutable after loading; `Send + Sync`.
#[derive(Debug, Clone)]
pub struct WordPieceTokenizer {
    vocab: HashMap<String, u32>,
    unk_id: u32,
    prefix: String,
    max_input_chars_per_word: usize,
    normalizer: Option<BertNormalizer>,
    /// Added tokens matched on raw text, longest first.
    raw_added: Vec<(String, u32)>,
    /// Added tokens matched on normalized text, longest first.
    normalized_added: Vec<(String, u32)>,
    /// Ids the post-processor puts before and after the sequence.
    template_prefix: Vec<u32>,
    template_suffix: Vec<u32>,
    max_id: u32,
}

impl WordPieceTokenizer {
    /// Loads `tokenizer.json`; anything this pipeline does not implement is a
    /// [`EngineError::BadModelFile`] rather than a silently different tokenizer.
    pub fn from_file(path: &Path) -> Result<WordPieceTokenizer> {
        let file: TokenizerFile = read_json(path)?;
        Self::build(file).map_err(|reason| EngineError::bad_file(path, reason))
    }

    /// Parses `tokenizer.json` text (tests build small ones inline).
    pub fn from_json_str(text: &str) -> Result<WordPieceTokenizer> {
        let here = Path::new("tokenizer.json");
        let file: TokenizerFile = serde_json::from_str(text)
            .map_err(|e| EngineError::bad_file(here, format!("is not valid: {e}")))?;
        Self::build(file).map_err(|reason| EngineError::bad_file(here, reason))
    }

    fn build(file: TokenizerFile) -> std::result::Result<WordPieceTokenizer, String> {
        let model = file.model;
        if let Some(kind) = model.kind.as_deref().filter(|k| *k != "WordPiece") {
            return Err(format!(
                "model type `{kind}` is not supported (only WordPiece)"
            ));
        }
        let unk_id = *model
            .vocab
            .get(&model.unk_token)
            .ok_or_else(|| format!("unk_token `{}` is not in the vocab", model.unk_token))?;
        let normalizer = file.normalizer.map(parse_normalizer).transpose()?;
        match file.pre_tokenizer.as_ref().and_then(|p| p.get("type")) {
            Some(Value::String(t)) if t == "BertPreTokenizer" => {}
            other => {
                return Err(format!(
                    "pre_tokenizer {} is not supported (only BertPreTokenizer)",
                    other.map_or("null".to_string(), Value::to_string)
                ))
            }
        }
        let mut raw_added = Vec::new();
        let mut normalized_added = Vec::new();
        for token in file.added_tokens {
            if token.single_word || token.lstrip || token.rstrip {
                return Err(format!(
                    "added token `{}` uses single_word/lstrip/rstrip, which is not supported",
                    token.content
                ));
            }
            if token.content.is_empty() {
                return Err(format!("added token {} has empty content", token.id));
            }
            if token.normalized {
                // HF matches these against their own normalized form.
                let content = match normalizer {
                    Some(n) => n.normalize(&token.content),
                    None => token.content,
                };
                if !content.is_empty() {
                    normalized_added.push((content, token.id));
                }
            } else {
                raw_added.push((token.content, token.id));
            }
        }
        // Longest first, so the first match at a position is the longest one.
        raw_added.sort_by_key(|(content, _)| std::cmp::Reverse(content.len()));
        normalized_added.sort_by_key(|(content, _)| std::cmp::Reverse(content.len()));
        let (template_prefix, template_suffix) = match file.post_processor {
            Some(p) => parse_post_processor(&p)?,
            None => (Vec::new(), Vec::new()),
        };
        let max_id = model
            .vocab
            .values()
            .chain(raw_added.iter().map(|(_, id)| id))
            .chain(normalized_added.iter().map(|(_, id)| id))
            .chain(template_prefix.iter())
            .chain(template_suffix.iter())
            .copied()
            .max()
            .unwrap_or(unk_id);
        Ok(WordPieceTokenizer {
            vocab: model.vocab,
            unk_id,
            prefix: model.continuing_subword_prefix,
            max_input_chars_per_word: model.max_input_chars_per_word,
            normalizer,
            raw_added,
            normalized_added,
            template_prefix,
            template_suffix,
            max_id,
        })
    }

    /// The largest id this tokenizer can emit.
    pub fn max_id(&self) -> u32 {
        self.max_id
    }

    /// Tokenizes `text` and wraps it in the single-sequence template
    /// (`[CLS] ... [SEP]`). Never truncates.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = self.template_prefix.clone();
        for (piece, added) in split_added(text, &self.raw_added) {
            if let Some(id) = added {
                ids.push(id);
                continue;
            }
            let normalized = match &self.normalizer {
                Some(n) => n.normalize(piece),
                None => piece.to_string(),
            };
            for (piece, added) in split_added(&normalized, &self.normalized_added) {
                match added {
                    Some(id) => ids.push(id),
                    None => {
                        for word in pre_tokenize(piece) {
                            self.word_piece(word, &mut ids);
                        }
                    }
                }
            }
        }
        ids.extend_from_slice(&self.template_suffix);
        ids
    }

    /// Greedy longest-match-first WordPiece for one pre-tokenized word.
    fn word_piece(&self, word: &str, out: &mut Vec<u32>) {
        if word.chars().count() > self.max_input_chars_per_word {
            out.push(self.unk_id);
            return;
        }
        let first = out.len();
        let mut candidate = String::with_capacity(word.len() + self.prefix.len());
        let mut start = 0;
        while start < word.len() {
            let mut end = word.len();
            let mut found = None;
            while start < end {
                candidate.clear();
                if start > 0 {
                    candidate.push_str(&self.prefix);
                }
                candidate.push_str(&word[start..end]);
                if let Some(&id) = self.vocab.get(candidate.as_str()) {
                    found = Some(id);
                    break;
                }
                // Step back one character (end stays on a char boundary).
                end = word[..end]
                    .char_indices()
                    .next_back()
                    .map_or(start, |(i, _)| i);
            }
            match found {
                Some(id) => out.push(id),
                None => {
                    out.truncate(first);
                    out.push(self.unk_id);
                    return;
                }
            }
            start = end;
        }
    }
}

impl BertNormalizer {
    fn normalize(&self, text: &str) -> String {
        let mut s: String = if self.clean_text {
            text.chars()
                .filter(|&c| !(c == '\0' || c == '\u{fffd}' || is_control(c)))
                .map(|c| if is_whitespace(c) { ' ' } else { c })
                .collect()
        } else {
            text.to_string()
        };
        if self.handle_chinese_chars && s.chars().any(is_chinese_char) {
            let mut spaced = String::with_capacity(s.len() + 8);
            for c in s.chars() {
                if is_chinese_char(c) {
                    spaced.push(' ');
                    spaced.push(c);
                    spaced.push(' ');
                } else {
                    spaced.push(c);
                }
            }
            s = spaced;
        }
        if self.strip_accents {
            s = s
                .as_str()
                .nfd()
                .map(|(c, _)| c)
                .filter(|c| !c.is_mark_nonspacing())
                .collect();
        }
        if self.lowercase {
            s = s.chars().flat_map(char::to_lowercase).collect();
        }
        s
    }
}

fn parse_normalizer(value: Value) -> std::result::Result<BertNormalizer, String> {
    let file: BertNormalizerFile = serde_json::from_value(value)
        .map_err(|e| format!("normalizer is not a BertNormalizer: {e}"))?;
    if file.kind != "BertNormalizer" {
        return Err(format!(
            "normalizer `{}` is not supported (only BertNormalizer)",
            file.kind
        ));
    }
    Ok(BertNormalizer {
        clean_text: file.clean_text,
        handle_chinese_chars: file.handle_chinese_chars,
        strip_accents: file.strip_accents.unwrap_or(file.lowercase),
        lowercase: file.lowercase,
    })
}

/// The ids the post-processor puts around a single sequence.
fn parse_post_processor(p: &Value) -> std::result::Result<(Vec<u32>, Vec<u32>), String> {
    let kind = p.get("type").and_then(Value::as_str).unwrap_or("");
    match kind {
        "BertProcessing" => {
            // {"cls": ["[CLS]", 101], "sep": ["[SEP]", 102]}
            let id = |key: &str| {
                p.get(key)
                    .and_then(|v| v.get(1))
                    .and_then(Value::as_u64)
                    .and_then(|id| u32::try_from(id).ok())
                    .ok_or_else(|| format!("BertProcessing has no valid `{key}` id"))
            };
            Ok((vec![id("cls")?], vec![id("sep")?]))
        }
        "TemplateProcessing" => {
            let pieces = p
                .get("single")
                .and_then(Value::as_array)
                .ok_or("TemplateProcessing has no `single` template")?;
            let specials = p.get("special_tokens");
            let (mut prefix, mut suffix) = (Vec::new(), Vec::new());
            let mut seen_sequence = false;
            for piece in pieces {
                if piece.get("Sequence").is_some() {
                    if seen_sequence {
                        return Err("the single template has two sequences".to_string());
                    }
                    seen_sequence = true;
                    continue;
                }
                let name = piece
                    .get("SpecialToken")
                    .and_then(|s| s.get("id"))
                    .and_then(Value::as_str)
                    .ok_or(
                        "the single template has a piece that is neither Sequence nor SpecialToken",
                    )?;
                let ids = specials
                    .and_then(|s| s.get(name))
                    .and_then(|s| s.get("ids"))
                    .and_then(Value::as_array)
                    .ok_or_else(|| format!("special token `{name}` has no ids"))?;
                for id in ids {
                    let id = id
                        .as_u64()
                        .and_then(|id| u32::try_from(id).ok())
                        .ok_or_else(|| format!("special token `{name}` has a bad id"))?;
                    if seen_sequence {
                        suffix.push(id);
                    } else {
                        prefix.push(id);
                    }
                }
            }
            if !seen_sequence {
                return Err("the single template has no sequence".to_string());
            }
            Ok((prefix, suffix))
        }
        other => Err(format!(
            "post_processor `{other}` is not supported (only TemplateProcessing, BertProcessing)"
        )),
    }
}

/// Splits `text` into pieces that are either an added token (with its id) or
/// plain text, matching leftmost-longest like `tokenizers`' Aho-Corasick.
/// `tokens` must be sorted longest first.
fn split_added<'a>(text: &'a str, tokens: &[(String, u32)]) -> Vec<(&'a str, Option<u32>)> {
    let mut pieces = Vec::new();
    if tokens.is_empty() {
        pieces.push((text, None));
        return pieces;
    }
    let mut plain_start = 0;
    let mut pos = 0;
    while pos < text.len() {
        let rest = &text[pos..];
        if let Some((token, id)) = tokens.iter().find(|(t, _)| rest.starts_with(t.as_str())) {
            if plain_start < pos {
                pieces.push((&text[plain_start..pos], None));
            }
            pieces.push((&text[pos..pos + token.len()], Some(*id)));
            pos += token.len();
            plain_start = pos;
        } else {
            pos += rest.chars().next().map_or(1, char::len_utf8);
        }
    }
    if plain_start < text.len() {
        pieces.push((&text[plain_start..], None));
    }
    pieces
}

/// `BertPreTokenizer`: whitespace separates words and is dropped; every
/// punctuation character is a word of its own.
fn pre_tokenize(text: &str) -> Vec<&str> {
    let mut words = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        if c.is_whitespace() || is_bert_punctuation(c) {
            if let Some(s) = start.take() {
                words.push(&text[s..i]);
            }
            if !c.is_whitespace() {
                words.push(&text[i..i + c.len_utf8()]);
            }
        } else if start.is_none() {
            start = Some(i);
        }
    }
    if let Some(s) = start {
        words.push(&text[s..]);
    }
    words
}

fn is_whitespace(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r') || c.is_whitespace()
}

/// Cc, Cf and Co (as `unicode_categories::is_other`), but not tab/newline/CR,
/// which count as whitespace.
fn is_control(c: char) -> bool {
    !matches!(c, '\t' | '\n' | '\r') && c.is_other()
}

fn is_bert_punctuation(c: char) -> bool {
    c.is_ascii_punctuation() || c.is_punctuation()
}

/// The CJK Unified Ideographs blocks (not Hangul, Hiragana or Katakana).
fn is_chinese_char(c: char) -> bool {
    matches!(
        c as u32,
        0x4E00..=0x9FFF
            | 0x3400..=0x4DBF
            | 0x20000..=0x2A6DF
            | 0x2A700..=0x2B73F
            | 0x2B740..=0x2B81F
            | 0x2B920..=0x2CEAF
            | 0xF900..=0xFAFF
            | 0x2F800..=0x2FA1F
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny BERT tokenizer.json in the shape of all-MiniLM-L6-v2's.
    fn tokenizer_with(max_chars: usize) -> WordPieceTokenizer {
        let vocab = [
            "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "un", "##aff",
            "##able", ",", "!", "cafe", "naive", "中", "国", "i", "[", "]", "sep", "a", "##b",
            "ab", "12", "##3", ".", "-", "x", "##x",
        ];
        let vocab: serde_json::Map<String, Value> = vocab
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), Value::from(i)))
            .collect();
        let special = |id: usize, content: &str| {
            serde_json::json!({"id": id, "content": content, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        };
        let file = serde_json::json!({
            "added_tokens": [special(0, "[PAD]"), special(1, "[UNK]"), special(2, "[CLS]"),
                             special(3, "[SEP]"), special(4, "[MASK]")],
            "normalizer": {"type": "BertNormalizer", "clean_text": true,
                "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
            "pre_tokenizer": {"type": "BertPreTokenizer"},
            "post_processor": {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}},
                           {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
                "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                                   "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}},
            "model": {"type": "WordPiece", "unk_token": "[UNK]",
                "continuing_subword_prefix": "##", "max_input_chars_per_word": max_chars,
                "vocab": vocab}
        });
        match WordPieceTokenizer::from_json_str(&file.to_string()) {
            Ok(t) => t,
            Err(e) => panic!("test tokenizer did not load: {e}"),
        }
    }

    /// Encodes and maps ids back to vocab strings, without [CLS]/[SEP].
    fn pieces(t: &WordPieceTokenizer, text: &str) -> Vec<String> {
        let by_id: HashMap<u32, &str> = t.vocab.iter().map(|(s, &i)| (i, s.as_str())).collect();
        let ids = t.encode(text);
        assert_eq!(ids.first(), Some(&2), "starts with [CLS]");
        assert_eq!(ids.last(), Some(&3), "ends with [SEP]");
        ids[1..ids.len() - 1]
            .iter()
            .map(|i| by_id.get(i).copied().unwrap_or("?").to_string())
            .collect()
    }

    fn check(text: &str, want: &[&str]) {
        assert_eq!(pieces(&tokenizer_with(100), text), want, "input {text:?}");
    }

    #[test]
    fn lowercases_and_splits_punctuation() {
        check("Hello, World!", &["hello", ",", "world", "!"]);
        check("hello,world!!", &["hello", ",", "world", "!", "!"]);
    }

    #[test]
    fn empty_and_blank_text_is_just_cls_sep() {
        assert_eq!(tokenizer_with(100).encode(""), vec![2, 3]);
        assert_eq!(
            tokenizer_with(100).encode(" \t\n\u{a0}\u{3000} "),
            vec![2, 3]
        );
    }

    #[test]
    fn strips_accents_after_nfd() {
        check("Café NAÏVE", &["cafe", "naive"]);
        // Precomposed and combining forms give the same ids.
        check("cafe\u{301}", &["cafe"]);
        // U+0130 decomposes to I + combining dot, which is dropped, then lowercased.
        check("\u{130}", &["i"]);
    }

    #[test]
    fn word_piece_uses_continuation_prefix() {
        check("unaffable", &["un", "##aff", "##able"]);
        check("abb", &["ab", "##b"]);
        check("123", &["12", "##3"]);
    }

    #[test]
    fn a_word_without_full_cover_is_one_unk() {
        // `un ##aff` matches but nothing covers the trailing `q`: the whole
        // word becomes a single [UNK], not `un ##aff [UNK]`.
        check("unaffq", &["[UNK]"]);
        check("hello unaffq world", &["hello", "[UNK]", "world"]);
        check("zzz", &["[UNK]"]);
    }

    #[test]
    fn overlong_word_is_unk() {
        let t = tokenizer_with(5);
        assert_eq!(pieces(&t, "xxxxx"), ["x", "##x", "##x", "##x", "##x"]);
        assert_eq!(pieces(&t, "xxxxxx"), ["[UNK]"]);
        assert_eq!(
            pieces(&t, "xxx, xxxxxxxxxx"),
            ["x", "##x", "##x", ",", "[UNK]"]
        );
    }

    #[test]
    fn chinese_characters_are_words_of_their_own() {
        check("中国", &["中", "国"]);
        check("hello中国world", &["hello", "中", "国", "world"]);
        // Hiragana is not in the CJK block: it stays one (unknown) word.
        check("ひらがな", &["[UNK]"]);
    }

    #[test]
    fn control_characters_are_removed_and_whitespace_unified() {
        check("hel\u{0}lo", &["hello"]);
        check("hel\u{fffd}lo", &["hello"]);
        check("hel\u{200b}lo", &["hello"]); // zero-width space is Cf, removed
        check("hel\u{e000}lo", &["hello"]); // private use
        check(
            "hello\u{a0}world\tx\ny\r",
            &["hello", "world", "x", "[UNK]"],
        );
    }

    #[test]
    fn special_tokens_in_raw_text_are_matched_before_normalizing() {
        let t = tokenizer_with(100);
        assert_eq!(t.encode("hello [SEP] world"), vec![2, 5, 3, 6, 3]);
        assert_eq!(t.encode("hello[MASK]world"), vec![2, 5, 4, 6, 3]);
        // Lowercase is not the special token: it is normalized and split.
        check("[sep]", &["[", "sep", "]"]);
    }

    #[test]
    fn unicode_punctuation_is_split() {
        check("hello\u{2014}world", &["hello", "[UNK]", "world"]); // em dash (Pd)
        check("a\u{3002}", &["a", "[UNK]"]); // ideographic full stop (Po)
        check("hello-world.", &["hello", "-", "world", "."]);
    }

    #[test]
    fn split_added_is_leftmost_longest() {
        let tokens = vec![
            ("abc".to_string(), 1),
            ("ab".to_string(), 2),
            ("bc".to_string(), 3),
        ];
        assert_eq!(
            split_added("xabcbc", &tokens),
            vec![("x", None), ("abc", Some(1)), ("bc", Some(3))]
        );
        assert_eq!(split_added("é", &tokens), vec![("é", None)]);
    }

    #[test]
    fn unsupported_files_are_refused_with_a_reason() {
        let bad = |json: &str, needle: &str| match WordPieceTokenizer::from_json_str(json) {
            Ok(_) => panic!("accepted {json}"),
            Err(e) => assert!(e.to_string().contains(needle), "{e} lacks {needle}"),
        };
        let model =
            r#""model": {"type": "WordPiece", "unk_token": "[UNK]", "vocab": {"[UNK]": 0}}"#;
        bad(
            r#"{"pre_tokenizer": {"type": "BertPreTokenizer"}, "model": {"type": "WordPiece", "unk_token": "[UNK]", "vocab": {"a": 0}}}"#,
            "unk_token",
        );
        bad(
            &format!(
                r#"{{"normalizer": {{"type": "NFC"}}, "pre_tokenizer": {{"type": "BertPreTokenizer"}}, {model}}}"#
            ),
            "normalizer",
        );
        bad(
            &format!(r#"{{"pre_tokenizer": {{"type": "Whitespace"}}, {model}}}"#),
            "pre_tokenizer",
        );
        bad(
            &format!(r#"{{"pre_tokenizer": null, {model}}}"#),
            "pre_tokenizer",
        );
        bad("{not json", "not valid");
    }
}
