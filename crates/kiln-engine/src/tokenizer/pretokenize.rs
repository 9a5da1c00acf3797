//! BPE pre-tokenizers: split a text fragment into the words BPE merges within.
//!
//! Each variant reproduces what llama.cpp does for a `tokenizer.ggml.pre`
//! value, including where its hand-written matchers differ from the regex
//! they stand for (a run of white space at the end of a piece is kept whole,
//! a lone space before punctuation at the end of a piece stands alone, ...).
//! Several expressions apply in sequence: each one only splits the pieces the
//! previous one produced, and piece boundaries act as the end of the text for
//! the next.
//!
//! Positions are code point indices; the result is slices of the input.

use super::unicode::CharClass;

/// The splitting rules of one `tokenizer.ggml.pre` family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PreTokenizer {
    /// `default` (or no `pre` key): punctuation runs, GPT-2 rules, digit runs,
    /// then ASCII digit triples.
    Default,
    /// GPT-2's expression.
    Gpt2,
    /// Every digit alone, then GPT-2's expression (starcoder, smollm, ...).
    DigitsThenGpt2,
    /// Llama 3's expression: case-insensitive contractions, digits in threes.
    Llama3,
    /// Qwen2's expression: as Llama 3 but digits one by one.
    Qwen2,
    /// Qwen3.5's expression: as Qwen2 but combining marks join letter runs.
    Qwen35,
}

/// What `PreTokenizer::for_name` resolved a `pre` name to.
pub(super) struct PreTokenizerConfig {
    pub kind: PreTokenizer,
    /// Whole words that are already tokens skip merging (llama.cpp's
    /// `ignore_merges`).
    pub ignore_merges: bool,
    /// The default for `add_bos` before `tokenizer.ggml.add_bos_token`.
    pub add_bos: bool,
    /// The family has no BOS token unless the metadata names one.
    pub no_default_bos: bool,
}

impl PreTokenizer {
    /// Names llama.cpp maps to each supported family; `None` for a name it
    /// does not know or that this crate does not implement.
    pub fn for_name(pre: &str) -> Option<PreTokenizerConfig> {
        let plain = |kind| PreTokenizerConfig {
            kind,
            ignore_merges: false,
            add_bos: false,
            no_default_bos: false,
        };
        let config = match pre {
            "" | "default" => plain(PreTokenizer::Default),
            "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es"
            | "jina-v2-de" | "a.x-4.0" | "mellum" | "modern-bert" | "exaone4" | "mpt" | "olmo"
            | "jais" | "trillion" | "granite-docling" => plain(PreTokenizer::Gpt2),
            "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone"
            | "minerva-7b" | "mellum2" => plain(PreTokenizer::DigitsThenGpt2),
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral"
            | "midm-2.0" | "lfm2" | "jina-v5-nano" => PreTokenizerConfig {
                ignore_merges: true,
                add_bos: true,
                ..plain(PreTokenizer::Llama3)
            },
            "dbrx" | "smaug-bpe" => plain(PreTokenizer::Llama3),
            "chatglm-bpe" => PreTokenizerConfig {
                no_default_bos: true,
                ..plain(PreTokenizer::Llama3)
            },
            "glm4" | "glm5" => PreTokenizerConfig {
                no_default_bos: true,
                ignore_merges: true,
                ..plain(PreTokenizer::Llama3)
            },
            "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" | "stablelm2"
            | "hunyuan" | "solar-open" | "grok-2" => plain(PreTokenizer::Qwen2),
            "qwen35" => plain(PreTokenizer::Qwen35),
            _ => return None,
        };
        Some(config)
    }

    /// Splits `text` into words (never empty, covering `text` in order).
    pub fn split(self, text: &str) -> Vec<&str> {
        let chars = Chars::new(text);
        let whole = vec![(0, chars.cps.len())];
        let pieces = match self {
            PreTokenizer::Default => {
                let p = split_runs(&chars, &whole, |cp, class| {
                    if cp < 0x80 {
                        is_default_ascii_punct(cp)
                    } else {
                        class.punctuation() && !class.whitespace()
                    }
                });
                let p = split_gpt2(&chars, &p);
                let p = split_runs(&chars, &p, |_, class| class.number());
                split_ascii_digit_triples(&chars, &p)
            }
            PreTokenizer::Gpt2 => split_gpt2(&chars, &whole),
            PreTokenizer::DigitsThenGpt2 => {
                let p = split_each(&chars, &whole, |_, class| class.number());
                split_gpt2(&chars, &p)
            }
            PreTokenizer::Llama3 => split_llama3_family(&chars, &whole, 3, false),
            PreTokenizer::Qwen2 => split_llama3_family(&chars, &whole, 1, false),
            PreTokenizer::Qwen35 => split_llama3_family(&chars, &whole, 1, true),
        };
        pieces
            .into_iter()
            .filter_map(|(a, b)| text.get(chars.byte_at(a)..chars.byte_at(b)))
            .filter(|w| !w.is_empty())
            .collect()
    }
}

/// ASCII members of `[\p{P}\$\+<=>\^~\|]` (the default pre-tokenizer's
/// first expression). Backtick is a symbol, not punctuation.
fn is_default_ascii_punct(cp: u32) -> bool {
    const SET: &[u8] = b"!\"#%&'()*,-./:;?@[\\]_{}$+<=>^~|";
    u8::try_from(cp).is_ok_and(|b| SET.contains(&b))
}

/// The text as code points with their classes and byte offsets.
struct Chars {
    cps: Vec<u32>,
    classes: Vec<CharClass>,
    /// `byte_offsets[i]` is where code point `i` starts; one extra at the end.
    byte_offsets: Vec<usize>,
}

impl Chars {
    fn new(text: &str) -> Chars {
        let n = text.len();
        let mut cps = Vec::with_capacity(n);
        let mut classes = Vec::with_capacity(n);
        let mut byte_offsets = Vec::with_capacity(n + 1);
        for (at, c) in text.char_indices() {
            cps.push(c as u32);
            classes.push(CharClass::of(c as u32));
            byte_offsets.push(at);
        }
        byte_offsets.push(n);
        Chars {
            cps,
            classes,
            byte_offsets,
        }
    }

    fn byte_at(&self, pos: usize) -> usize {
        self.byte_offsets.get(pos).copied().unwrap_or(0)
    }
}

/// A view of one piece `[start, end)`: reads past `end` see nothing, which is
/// how the matchers treat the end of a piece.
struct Piece<'a> {
    chars: &'a Chars,
    end: usize,
    prev_end: usize,
    out: &'a mut Vec<(usize, usize)>,
}

impl Piece<'_> {
    fn cp(&self, pos: usize) -> Option<u32> {
        if pos < self.end {
            self.chars.cps.get(pos).copied()
        } else {
            None
        }
    }

    fn class(&self, pos: usize) -> CharClass {
        if pos < self.end {
            self.chars
                .classes
                .get(pos)
                .copied()
                .unwrap_or(CharClass::NONE)
        } else {
            CharClass::NONE
        }
    }

    fn is(&self, pos: usize, c: char) -> bool {
        self.cp(pos) == Some(c as u32)
    }

    fn is_cr_or_lf(&self, pos: usize) -> bool {
        self.is(pos, '\r') || self.is(pos, '\n')
    }

    /// Ends the current word at `end`.
    fn emit(&mut self, end: usize) {
        if end > self.prev_end {
            self.out.push((self.prev_end, end));
        }
        self.prev_end = end;
    }

    /// Length of an English contraction (`'s`, `'t`, `'re`, `'ve`, `'m`,
    /// `'ll`, `'d`) starting at `pos`, or 0.
    fn contraction_len(&self, pos: usize, ignore_case: bool) -> usize {
        if !self.is(pos, '\'') || pos + 1 >= self.end {
            return 0;
        }
        let lower = |p: usize| {
            let c = self.cp(p).and_then(char::from_u32);
            match c {
                Some(c) if ignore_case => Some(c.to_ascii_lowercase()),
                other => other,
            }
        };
        if matches!(lower(pos + 1), Some('s' | 't' | 'm' | 'd')) {
            return 2;
        }
        if pos + 2 < self.end {
            let pair = (lower(pos + 1), lower(pos + 2));
            if matches!(
                pair,
                (Some('r'), Some('e')) | (Some('v'), Some('e')) | (Some('l'), Some('l'))
            ) {
                return 3;
            }
        }
        0
    }

    /// White-space rules shared by all matchers: a white-space run followed
    /// by more text leaves its last character to the next word; otherwise
    /// (end of piece, or a single character) it is one word. Returns the new
    /// position, or `None` if `pos` is not white space.
    fn whitespace_run(&mut self, pos: usize) -> Option<usize> {
        let mut n = 0;
        while self.class(pos + n).whitespace() {
            n += 1;
        }
        if n > 1 && pos + n < self.end {
            self.emit(pos + n - 1);
            Some(pos + n - 1)
        } else if n > 0 {
            self.emit(pos + n);
            Some(pos + n)
        } else {
            None
        }
    }
}

fn for_each_piece(
    chars: &Chars,
    pieces: &[(usize, usize)],
    mut split: impl FnMut(&mut Piece<'_>, usize),
) -> Vec<(usize, usize)> {
    let mut out = Vec::with_capacity(pieces.len() * 2);
    for &(start, end) in pieces {
        let mut piece = Piece {
            chars,
            end,
            prev_end: start,
            out: &mut out,
        };
        split(&mut piece, start);
    }
    out
}

/// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
fn split_gpt2(chars: &Chars, pieces: &[(usize, usize)]) -> Vec<(usize, usize)> {
    for_each_piece(chars, pieces, |p, start| {
        let mut pos = start;
        while pos < p.end {
            let n = p.contraction_len(pos, false);
            if n > 0 {
                pos += n;
                p.emit(pos);
                continue;
            }
            let space = p.is(pos, ' ');
            let lead = if space {
                p.class(pos + 1)
            } else {
                p.class(pos)
            };
            let run: Option<fn(CharClass) -> bool> = if lead.letter() {
                Some(CharClass::letter)
            } else if lead.number() {
                Some(CharClass::number)
            } else if gpt2_other(lead) {
                Some(gpt2_other)
            } else {
                None
            };
            if let Some(in_run) = run {
                pos += usize::from(space);
                while in_run(p.class(pos)) {
                    pos += 1;
                }
                p.emit(pos);
                continue;
            }
            if let Some(next) = p.whitespace_run(pos) {
                pos = next;
                continue;
            }
            pos += 1;
            p.emit(pos);
        }
    })
}

/// `[^\s\p{L}\p{N}]`, within the piece.
fn gpt2_other(c: CharClass) -> bool {
    !(c.whitespace() || c.letter() || c.number() || c.is_none())
}

/// Llama 3 / Qwen2 / Qwen3.5:
/// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,D}|
///  ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
/// with `D = max_digits`; `marks` adds `\p{M}` to the letter class.
fn split_llama3_family(
    chars: &Chars,
    pieces: &[(usize, usize)],
    max_digits: usize,
    marks: bool,
) -> Vec<(usize, usize)> {
    let wordish = move |c: CharClass| c.letter() || (marks && c.mark());
    for_each_piece(chars, pieces, |p, start| {
        let mut pos = start;
        while pos < p.end {
            let class = p.class(pos);
            let n = p.contraction_len(pos, true);
            if n > 0 {
                pos += n;
                p.emit(pos);
                continue;
            }
            // [^\r\n\p{L}\p{N}]?\p{L}+
            if !(p.is_cr_or_lf(pos) || class.number())
                && (wordish(class) || wordish(p.class(pos + 1)))
            {
                pos += 1;
                while wordish(p.class(pos)) {
                    pos += 1;
                }
                p.emit(pos);
                continue;
            }
            // \p{N}{1,D}
            if class.number() {
                let mut run_start = pos;
                while p.class(pos).number() {
                    pos += 1;
                    if pos - run_start >= max_digits {
                        p.emit(pos);
                        run_start = pos;
                    }
                }
                p.emit(pos);
                continue;
            }
            // ' ?[^\s\p{L}\p{N}]+[\r\n]*' (the test of the first character
            // looks at the character after a space, but requires only that
            // the space itself is in the piece)
            let other =
                |c: CharClass| !(c.whitespace() || c.letter() || c.number() || (marks && c.mark()));
            let space = p.is(pos, ' ');
            let lead = if space { p.class(pos + 1) } else { class };
            if other(lead) && !class.is_none() {
                pos += usize::from(space);
                while other(p.class(pos)) && !p.class(pos).is_none() {
                    pos += 1;
                }
                while p.is_cr_or_lf(pos) {
                    pos += 1;
                }
                p.emit(pos);
                continue;
            }
            // \s*[\r\n]+ : white space up to its last CR/LF
            let mut n = 0;
            let mut after_last_newline = None;
            while p.class(pos + n).whitespace() {
                if p.is_cr_or_lf(pos + n) {
                    after_last_newline = Some(pos + n + 1);
                }
                n += 1;
            }
            if let Some(end) = after_last_newline {
                pos = end;
                p.emit(pos);
                continue;
            }
            if let Some(next) = p.whitespace_run(pos) {
                pos = next;
                continue;
            }
            pos += 1;
            p.emit(pos);
        }
    })
}

/// Splits out every code point matching `pred` as its own word (a regex that
/// matches one character); the text between matches stays whole.
fn split_each(
    chars: &Chars,
    pieces: &[(usize, usize)],
    pred: impl Fn(u32, CharClass) -> bool,
) -> Vec<(usize, usize)> {
    for_each_piece(chars, pieces, |p, start| {
        for pos in start..p.end {
            if let Some(cp) = p.cp(pos) {
                if pred(cp, p.class(pos)) {
                    p.emit(pos);
                    p.emit(pos + 1);
                }
            }
        }
        let end = p.end;
        p.emit(end);
    })
}

/// Splits out maximal runs of code points matching `pred` (a `[...]+` regex).
fn split_runs(
    chars: &Chars,
    pieces: &[(usize, usize)],
    pred: impl Fn(u32, CharClass) -> bool,
) -> Vec<(usize, usize)> {
    for_each_piece(chars, pieces, |p, start| {
        let matches =
            |p: &Piece<'_>, pos: usize| p.cp(pos).is_some_and(|cp| pred(cp, p.class(pos)));
        let mut pos = start;
        while pos < p.end {
            if matches(p, pos) {
                p.emit(pos);
                while matches(p, pos) {
                    pos += 1;
                }
                p.emit(pos);
            } else {
                pos += 1;
            }
        }
        let end = p.end;
        p.emit(end);
    })
}

/// `[0-9][0-9][0-9]`: leftmost non-overlapping ASCII digit triples.
fn split_ascii_digit_triples(chars: &Chars, pieces: &[(usize, usize)]) -> Vec<(usize, usize)> {
    for_each_piece(chars, pieces, |p, start| {
        let digit =
            |p: &Piece<'_>, pos: usize| p.cp(pos).is_some_and(|cp| (0x30..=0x39).contains(&cp));
        let mut pos = start;
        while pos < p.end {
            if digit(p, pos) && digit(p, pos + 1) && digit(p, pos + 2) {
                p.emit(pos);
                p.emit(pos + 3);
                pos += 3;
            } else {
                pos += 1;
            }
        }
        let end = p.end;
        p.emit(end);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(kind: PreTokenizer, text: &str) -> Vec<&str> {
        kind.split(text)
    }

    #[test]
    fn gpt2_basics() {
        assert_eq!(
            split(PreTokenizer::Gpt2, "Hello world, I'm here  now"),
            ["Hello", " world", ",", " I", "'m", " here", " ", " now"]
        );
        // a white-space run at the end of the text stays whole
        assert_eq!(split(PreTokenizer::Gpt2, "a   "), ["a", "   "]);
        assert_eq!(split(PreTokenizer::Gpt2, "x\n\ny"), ["x", "\n", "\n", "y"]);
    }

    #[test]
    fn digits_then_gpt2_isolates_digits() {
        assert_eq!(
            split(PreTokenizer::DigitsThenGpt2, "pi 3.14 x"),
            ["pi", " ", "3", ".", "1", "4", " x"]
        );
        // the digit split ends the piece, so the spaces before it stay whole
        assert_eq!(
            split(PreTokenizer::DigitsThenGpt2, "a  1"),
            ["a", "  ", "1"]
        );
    }

    #[test]
    fn llama3_and_qwen2_digits() {
        assert_eq!(split(PreTokenizer::Llama3, "1234567"), ["123", "456", "7"]);
        assert_eq!(split(PreTokenizer::Qwen2, "123"), ["1", "2", "3"]);
        assert_eq!(
            split(PreTokenizer::Llama3, "I'LL go!\n\n  ok"),
            ["I", "'LL", " go", "!\n\n", " ", " ok"]
        );
        assert_eq!(split(PreTokenizer::Qwen2, "a \n b"), ["a", " \n", " b"]);
    }

    #[test]
    fn default_pretokenizer() {
        assert_eq!(
            split(PreTokenizer::Default, "ab... 12345"),
            ["ab", "...", " ", "123", "45"]
        );
    }

    #[test]
    fn pieces_cover_the_text() {
        let text = "Ünïcödé  \t\r\n mixed 中文 👩‍👩‍👧 ''' 'S 12½ \u{E000}\u{378}";
        for kind in [
            PreTokenizer::Default,
            PreTokenizer::Gpt2,
            PreTokenizer::DigitsThenGpt2,
            PreTokenizer::Llama3,
            PreTokenizer::Qwen2,
            PreTokenizer::Qwen35,
        ] {
            let words = split(kind, text);
            assert_eq!(words.concat(), text, "{kind:?}");
            assert!(words.iter().all(|w| !w.is_empty()));
        }
    }

    #[test]
    fn unknown_name_is_none() {
        assert!(PreTokenizer::for_name("no-such-pre").is_none());
        assert!(PreTokenizer::for_name("smollm").is_some());
    }
}
